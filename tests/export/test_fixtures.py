"""The tiny checkpoint is a real Qwen2 model with a realistic tokenizer and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.routing_cases import ROUTING_CASES
from tests.fixtures.paths import QWEN_TOKENIZER_ENV


def test_tiny_checkpoint_is_qwen2_with_chatml_bpe(tiny_checkpoint: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    assert config.model_type == "qwen2"
    assert config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert config.vocab_size == len(tokenizer)
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tokenizer.encode(special)) == 1, special
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == config.eos_token_id
    # Route names, JSON and English split into several tokens, as with the real BPE.
    for text in ("code_generation", '{"route": "bug_fixing"}', "Book me a train to Paris"):
        assert len(tokenizer.encode(text)) > 2, text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    case = ROUTING_CASES[0]
    rendered = tokenizer.apply_chat_template(
        case.chat_messages(), add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<|im_start|>system\nYou are Qwen")
    assert rendered.endswith("<|im_start|>assistant\n")
    saved = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in saved["chat_template"]


def test_tiny_checkpoint_weights_are_tied(tiny_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_qwen_tokenizer_dir_holds_the_real_tokenizer(qwen_tokenizer_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(qwen_tokenizer_dir / "tokenizer.json"))
    assert tokenizer.token_to_id("<|im_end|>") == 151645


def test_bpe_tokenizer_without_shared_uses_the_same_chatml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, qwen_tokenizer_dir: Path
) -> None:
    from jinja2 import Template

    from tests.fixtures.checkpoints import CHATML_FALLBACK, _write_bpe_tokenizer

    monkeypatch.setenv(QWEN_TOKENIZER_ENV, str(tmp_path / "absent"))
    _write_bpe_tokenizer(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == CHATML_FALLBACK
    real = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u\nv"},
        {"role": "assistant", "content": "a"},
    ]
    for convo in (messages, messages[1:]):
        ours = Template(CHATML_FALLBACK).render(messages=convo, add_generation_prompt=True)
        theirs = Template(real).render(messages=convo, add_generation_prompt=True, tools=None)
        assert ours == theirs
