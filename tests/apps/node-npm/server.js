// corral test app: GET / describes the release, GET /healthz answers "ok".
"use strict";

const fs = require("fs");
const http = require("http");
const path = require("path");
const ms = require("ms");

const APP_NAME = "node-npm";
const port = Number(process.env.PORT || 8080);

const server = http.createServer((req, res) => {
  const url = req.url.split("?")[0];
  if (req.method === "GET" && url === "/") {
    const body = JSON.stringify({
      app: APP_NAME,
      version: fs.readFileSync(path.join(__dirname, "VERSION"), "utf8").trim(),
      greeting: process.env.GREETING ?? null,
      secret_set: process.env.API_TOKEN !== undefined,
      ms: ms("2s"),
    });
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(body);
  } else if (req.method === "GET" && url === "/healthz") {
    res.writeHead(200, { "Content-Type": "text/plain; charset=utf-8" });
    res.end("ok");
  } else {
    res.writeHead(404, { "Content-Type": "text/plain; charset=utf-8" });
    res.end("not found");
  }
});

server.listen(port, "0.0.0.0", () => console.log(`${APP_NAME} listening on 0.0.0.0:${port}`));

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
