"""HTTP sink in the Loki push API format (``POST /loki/api/v1/push``, JSON)."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

from corral_log.records import Chunk
from corral_log.sinks._base import SinkRejected, SinkUnavailable


def loki_payload(chunk: Chunk, extra_labels: dict[str, str]) -> dict[str, Any]:
    """The push body: one stream per (app, process, instance, stream), values in order."""
    streams: dict[tuple[str, str, str, str], list[list[Any]]] = {}
    for r in chunk.records():
        key = (r.app, r.process, r.instance, r.stream)
        value: list[Any] = [str(r.time_ns), r.message]
        if r.partial:
            value.append({"partial": "1"})
        streams.setdefault(key, []).append(value)
    return {
        "streams": [
            {
                "stream": {**extra_labels, "app": a, "process": p, "instance": i, "stream": s},
                "values": values,
            }
            for (a, p, i, s), values in streams.items()
        ]
    }


class LokiSink:
    """Pushes chunks as Loki push requests; 2xx delivers, 429/5xx/network retry, 4xx drops."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        labels: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"http sink url {url!r} must be http(s)://host[:port]/path")
        self.name = name
        self.url = url
        self.labels = dict(labels or {})
        self.headers = {**(headers or {}), "Content-Type": "application/json"}
        self.timeout_s = timeout_s
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port
        self._path = (u.path or "/loki/api/v1/push") + (f"?{u.query}" if u.query else "")
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def __call__(self, chunk: Chunk) -> None:
        """Push the chunk as one request."""
        body = json.dumps(loki_payload(chunk, self.labels), ensure_ascii=False).encode()
        try:
            conn = self._connection()
            conn.request("POST", self._path, body, self.headers)
            resp = conn.getresponse()
            detail = resp.read()[:200].decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise SinkUnavailable(f"http {self.url}: {exc}") from exc
        if 200 <= resp.status < 300:
            return
        if resp.status == 429 or resp.status >= 500:
            self.close()
            raise SinkUnavailable(f"http {self.url}: {resp.status} {detail}")
        raise SinkRejected(f"http {self.url} refused the push: {resp.status} {detail}")

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
