"""Shared fixtures. Each area keeps its fixtures in tests/fixtures/<area>.py; they are
re-exported here so every test directory can use them."""

from tests.fixtures.encoder import *  # noqa: F403
from tests.fixtures.models import *  # noqa: F403
