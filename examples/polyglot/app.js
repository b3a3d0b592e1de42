// A mesh agent in Node.js with the standard library only (no npm packages).
//
// It is a plain HTTP server on 127.0.0.1. Its sidecar (`agentmesh sidecar ... -- node app.js`)
// does everything mesh-related: it serves the capabilities of agent.yaml with mTLS, checks the
// input against their JSON Schemas, and forwards each call here; it also offers the egress for
// this app's own calls. What the app may rely on (docs/sidecar.md):
//   AGENTMESH_APP_PORT    where to listen (given by the sidecar that started the app)
//   AGENTMESH_EGRESS_URL  POST {egress}/v1/invoke/{capability} calls any capability in the mesh
//   agentmesh-caller-id   the caller's verified SPIFFE ID (only the sidecar can reach us)
//   agentmesh-timeout-ms, traceparent, agentmesh-chain: pass them on to the egress.
"use strict";

const http = require("node:http");

const PORT = Number(process.env.AGENTMESH_APP_PORT || 8080);
const EGRESS = process.env.AGENTMESH_EGRESS_URL || "http://127.0.0.1:15001";
// The headers a call passes on, so the mesh keeps one deadline, one trace and one chain.
const PASS_ON = ["agentmesh-timeout-ms", "traceparent", "tracestate", "agentmesh-chain"];
const served = {};

function readJson(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      try {
        resolve(JSON.parse(Buffer.concat(chunks).toString("utf8") || "{}"));
      } catch (err) {
        reject(err);
      }
    });
    req.on("error", reject);
  });
}

function send(res, status, body, type = "application/json") {
  const data = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { "content-type": type, "content-length": data.length });
  res.end(data);
}

// Call a capability through the sidecar's egress: the mesh's retries, balancing, mTLS and
// policies apply, and errors come back as problem+json documents.
function callMesh(capability, payload, incoming) {
  const body = Buffer.from(JSON.stringify(payload));
  const headers = { "content-type": "application/json", "content-length": body.length };
  for (const name of PASS_ON) {
    if (incoming.headers[name]) headers[name] = incoming.headers[name];
  }
  return new Promise((resolve, reject) => {
    const req = http.request(`${EGRESS}/v1/invoke/${capability}`, { method: "POST", headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        resolve({ status: res.statusCode, type: res.headers["content-type"], text });
      });
    });
    req.on("error", reject);
    req.end(body);
  });
}

const routes = {
  async "/shout"(req, res) {
    const { text } = await readJson(req);
    send(res, 200, { text: text.toUpperCase(), caller: req.headers["agentmesh-caller-id"] || null });
  },

  async "/countdown"(req, res) {
    const { start, interval_ms: interval = 10 } = await readJson(req);
    res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
    for (let n = start; n >= 1; n--) {
      if (res.destroyed) return; // the caller went away: stop working
      res.write(`data: ${JSON.stringify({ n })}\n\n`);
      await new Promise((r) => setTimeout(r, interval));
    }
    res.end();
  },

  async "/headline"(req, res) {
    const { text, max_words: maxWords = 6 } = await readJson(req);
    const answer = await callMesh("summarize", { text, max_words: maxWords }, req);
    if (answer.status !== 200) {
      // Pass the mesh's problem document on: the caller sees the same error code.
      res.writeHead(answer.status, { "content-type": answer.type || "application/problem+json" });
      res.end(answer.text);
      return;
    }
    const summary = JSON.parse(answer.text);
    send(res, 200, {
      headline: summary.text.replace(/[.!?]+$/, ""),
      words: summary.words,
      traceparent: req.headers["traceparent"] || null,
    });
  },
};

const server = http.createServer(async (req, res) => {
  if (req.method === "GET" && req.url === "/healthz") return send(res, 200, { status: "ok" });
  if (req.method === "GET" && req.url === "/served") return send(res, 200, served);
  const route = req.method === "POST" && routes[req.url];
  if (!route) return send(res, 404, { error: `no route ${req.method} ${req.url}` });
  served[req.url] = (served[req.url] || 0) + 1;
  try {
    await route(req, res);
  } catch (err) {
    if (!res.headersSent) send(res, 500, { error: String(err) });
    else res.destroy(err);
  }
});

server.keepAliveTimeout = 75_000; // longer than the sidecar's idle keep-alive: it closes first
server.listen(PORT, "127.0.0.1", () => console.log(`headliner app listening on 127.0.0.1:${PORT}`));

function stop(signal) {
  console.log(`headliner app: ${signal}, closing`);
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 5000).unref();
}
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));
