"""A running `sglc serve` as a program backend, over the native `POST /generate` API."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from sgl_compile.errors import SglcError
from sgl_compile.lang.backend import Backend
from sgl_compile.tokenizer import Tokenizer


class RuntimeEndpoint(Backend):
    """`RuntimeEndpoint("http://127.0.0.1:30000", api_key=...)`.

    Programs send token ids, so the client needs the model's tokenizer: pass `tokenizer=`, or it is opened
    from the model path the server reports (`/get_model_info`), which must resolve on this machine."""

    def __init__(
        self, url: str, api_key: str | None = None, tokenizer: Tokenizer | None = None, timeout: float = 600
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            from sgl_compile.models.loading import open_checkpoint

            model = self.get_model_info()["model_path"]
            self._tokenizer = open_checkpoint(model).tokenizer
        return self._tokenizer

    def get_model_info(self) -> dict[str, Any]:
        return self._check(self._http.get("/get_model_info")).json()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code != 200:
            response.read()
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise SglcError(f"{self.url}: HTTP {response.status_code}: {message}")
        return response

    def generate(
        self,
        input_ids: list[list[int]],
        sampling_params: dict[str, Any],
        return_logprob: bool = False,
        logprob_start_len: int = -1,
    ) -> list[dict[str, Any]]:
        body = {
            "input_ids": [list(ids) for ids in input_ids],
            "sampling_params": sampling_params,
            "return_logprob": return_logprob,
            "logprob_start_len": logprob_start_len,
        }
        return self._check(self._http.post("/generate", json=body)).json()

    def stream(self, input_ids: list[int], sampling_params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        body = {"input_ids": list(input_ids), "sampling_params": sampling_params, "stream": True}
        with self._http.stream("POST", "/generate", json=body) as response:
            self._check(response)
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return
                out = json.loads(data)
                if "error" in out:
                    raise SglcError(f"{self.url}: {out['error']['message']}")
                yield out

    def close(self) -> None:
        self._http.close()
