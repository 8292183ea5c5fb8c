#!/usr/bin/env node
// grpc-router example client: Route and DispatchStream from Node.js.
//
//   node client.js route "write a haiku about rust"            # prints the decision as JSON
//   node client.js stream "translate hello into French"        # decision, then tokens, then usage
//   options: --target host:port (default 127.0.0.1:50051, or $GRPC_ROUTER_TARGET)
//            --request-id ID, --timeout SECONDS (default 30)
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");

function loadService() {
  const definition = protoLoader.loadSync("grpc_router/v1/router.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (request_id, not requestId)
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).grpc_router.v1.RouterService;
}

function parseArgs(argv) {
  const opts = {
    target: process.env.GRPC_ROUTER_TARGET || "127.0.0.1:50051",
    requestId: "",
    timeout: 30,
  };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--target") opts.target = argv[++i];
    else if (a === "--request-id") opts.requestId = argv[++i];
    else if (a === "--timeout") opts.timeout = Number(argv[++i]);
    else rest.push(a);
  }
  const [command, ...text] = rest;
  if (!["route", "stream"].includes(command) || text.length === 0) {
    console.error('usage: node client.js route|stream "message text" [--target host:port]');
    process.exit(2);
  }
  return { command, text: text.join(" "), ...opts };
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function fail(err) {
  console.error(`grpc-router: ${grpc.status[err.code] || err.code}: ${err.details || err.message}`);
  process.exit(1);
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const RouterService = loadService();
  const client = new RouterService(args.target, grpc.credentials.createInsecure());
  const route = {
    messages: [{ role: "ROLE_USER", content: args.text }],
    request_id: args.requestId,
  };

  if (args.command === "route") {
    client.Route(route, { deadline: deadline(args.timeout) }, (err, response) => {
      if (err) fail(err);
      console.log(JSON.stringify(response));
      client.close();
    });
    return;
  }

  // DispatchStream: one JSON line per chunk (decision, delta..., end).
  const call = client.DispatchStream(
    { route, max_tokens: 256 },
    { deadline: deadline(args.timeout) },
  );
  call.on("data", (chunk) => {
    const kind = chunk.chunk; // "decision" | "delta" | "end" (oneofs: true)
    console.log(JSON.stringify({ [kind]: chunk[kind] }));
  });
  call.on("error", fail);
  call.on("end", () => client.close());
}

main();
