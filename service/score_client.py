"""Client of the teacher scoring service (``service.teacher``): token ids in, ``SequenceScores`` out.

Retries with exponential backoff on what a replica going away looks like from outside: refused
or dropped connections, timeouts, 500 (the guard's answer when the engine died under a request),
502/503/504 (Serve's full queue or a restarting replica).
A 4xx is the request's own fault and raises at once with the server's message. Pure: httpx, the
codec and the guard's key loading, no Ray, so training workers can use it without the teacher entering their memory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence

import httpx

from service.guard import load_api_key
from service.score_codec import SCORE_PATH, SequenceScores, decode_scores

log = logging.getLogger(__name__)

RETRY_STATUSES = (500, 502, 503, 504)


class TeacherServiceError(RuntimeError):
    """The service refused a request (4xx), or kept failing past the retries."""


class TeacherClient:
    """``TeacherClient(base_url, api_key).score(sequences, prompt_lens, top_k)``; counts its retries."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 120.0, retries: int = 8,
                 backoff_s: float = 0.5, max_backoff_s: float = 15.0):
        self.url = base_url.rstrip("/") + SCORE_PATH
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=timeout_s)
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.retried = 0  # requests sent again after a transient failure, over the client's life

    @classmethod
    def with_key_from(cls, base_url: str, api_key_env: str | None, api_key_file: str | None, **kwargs) -> TeacherClient:
        """A client whose key is read here, from the file or env var (as the service reads its own)."""
        return cls(base_url, load_api_key(api_key_env, api_key_file), **kwargs)

    def score(self, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], top_k: int,
              dtype: str = "float16") -> list[SequenceScores]:
        body = json.dumps({"sequences": [list(map(int, s)) for s in sequences],
                           "prompt_lens": [int(n) for n in prompt_lens], "top_k": int(top_k), "dtype": dtype})
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                r = self._http.post(self.url, content=body, headers={"Content-Type": "application/json"})
                if r.status_code == 200:
                    return decode_scores(r.content)
                if r.status_code not in RETRY_STATUSES:
                    raise TeacherServiceError(f"teacher service at {self.url} answered {r.status_code}: "
                                              f"{r.text[:500]}")
                problem = f"HTTP {r.status_code}"
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            if attempt == self.retries:
                break
            self.retried += 1
            log.warning("teacher service %s: %s; retry %d/%d in %.1f s", self.url, problem, attempt + 1,
                        self.retries, delay)
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)
        raise TeacherServiceError(f"teacher service at {self.url} failed {self.retries + 1} times, last: {problem}")

    def close(self) -> None:
        self._http.close()
