"""transformers as a backend: generation, per-token log-probs and final-layer hidden states.

Scoring sorts items by length and packs them into batches under a token budget
(`batch_tokens` = longest row x rows), so padding stays small; spans are computed per row from
explicit indices, with explicit position ids, so the result is the same with left or right
padding (METHODS.md §5 index recipe). Log-probs are accumulated in fp32 or better.
Generation: greedy requests go in length-sorted batches; sampled requests go one request per
`generate` call, seeded with the request's own row seed (torch's sampler has one generator per
call), so a sample does not depend on which rows share its part or batch: re-sharding changes
nothing here, at the cost of batching (METHODS.md §9). Generation stops at the chat template's
end-of-turn token as well as EOS. Leaves out: structured output (vLLM serves it).

Example: HFBackend(path, dtype="float32").hidden_states([ScoreItem(msgs, "Paris.")])[0].shape -> (T, d)
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Callable, Iterator, Literal

import numpy as np

from curate.backends.base import ChatRequest, Completion, ScoreItem, encode_item, encode_prompt, end_of_turn_id
from curate.keys import digest
from curate.models import resolve_model
from curate.progress import work_done, work_started

log = logging.getLogger(__name__)


def length_batches(lengths: list[int], batch_tokens: int, max_rows: int) -> Iterator[list[int]]:
    """Indices grouped by similar length so that rows x longest <= batch_tokens (one row at least).

    Example: list(length_batches([5, 1, 4], 10, 8)) -> [[1, 2], [0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batch: list[int] = []
    for i in order:
        if batch and ((len(batch) + 1) * lengths[i] > batch_tokens or len(batch) >= max_rows):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


class HFBackend:
    """A transformers causal LM loaded once. Example: HFBackend("smollm2-135m-instruct").logprobs(items)"""

    def __init__(self, model: str, dtype: str = "float32", device: str | None = None, batch_tokens: int = 8192,
                 max_rows: int = 64, padding_side: Literal["left", "right"] = "right", trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        resolved = resolve_model(model)
        self.name = resolved.name
        self.identity = resolved.identity
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "float64": torch.float64, "auto": "auto"}[dtype]
        if trust_remote_code:
            log.warning("%s: trust_remote_code is on (set in the pipeline): the model folder's own Python code runs",
                        resolved.name)
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch_dtype,
                                                          trust_remote_code=trust_remote_code).to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.batch_tokens = batch_tokens
        self.max_rows = max_rows
        self.padding_side = padding_side

    # Batching -------------------------------------------------------------------------------
    def _padded(self, rows: list[list[int]], side: str) -> tuple[Any, Any, Any, list[int]]:
        """Token, mask and position tensors for rows padded on `side`; returns each row's offset."""
        import torch

        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        offsets = []
        for b, row in enumerate(rows):
            offset = width - len(row) if side == "left" else 0
            ids[b, offset:offset + len(row)] = torch.tensor(row)
            mask[b, offset:offset + len(row)] = 1
            positions[b, offset:offset + len(row)] = torch.arange(len(row))
            offsets.append(offset)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device), offsets

    def _scored_batches(self, items: list[ScoreItem]) -> Iterator[tuple[list[int], list[tuple[list[int], int]], Any, list[int]]]:
        """Encode items (METHODS §0) and yield (indices, encodings, padded tensors, offsets) per batch."""
        encoded = [encode_item(self.tokenizer, item) for item in items]
        work_started(len(items))  # each batch the caller is done with moves the run's progress bar
        for batch in length_batches([len(ids) for ids, _ in encoded], self.batch_tokens, self.max_rows):
            rows = [encoded[i] for i in batch]
            tensors = self._padded([ids for ids, _ in rows], self.padding_side)
            yield batch, rows, tensors[:3], tensors[3]
            work_done(len(batch))

    # Scoring --------------------------------------------------------------------------------
    def logprobs(self, items: list[ScoreItem]) -> list[np.ndarray]:
        """Per-token log-probs (float64) of each response after its prompt.

        Position t-1 predicts token t, so the response tokens start..L-1 are read at start-1..L-2.
        Example: backend.logprobs([ScoreItem(msgs, "Paris.")])[0].sum() -> -2.84
        """
        import torch

        out: list[np.ndarray | None] = [None] * len(items)
        with torch.inference_mode():
            for batch, rows, (ids, mask, positions), offsets in self._scored_batches(items):
                # Logits only from the first position that predicts a response token on: a long
                # prompt times a large vocabulary (Gemma: 262k) would dominate the cost otherwise.
                first = min(offset + start - 1 for (_, start), offset in zip(rows, offsets))
                width = ids.shape[1]
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    logits_to_keep=width - first).logits
                for b, (i, (row, start), offset) in enumerate(zip(batch, rows, offsets)):
                    span = slice(offset + start - 1 - first, offset + len(row) - 1 - first)
                    logp = torch.log_softmax(logits[b, span].double(), dim=-1)
                    targets = torch.tensor(row[start:], device=logp.device)
                    out[i] = logp.gather(1, targets[:, None])[:, 0].cpu().numpy()
        return out  # type: ignore[return-value]

    def hidden_states(self, items: list[ScoreItem]) -> list[np.ndarray]:
        """Final-layer hidden states (after the final norm) at the positions predicting each response token.

        For a row of length L with prompt length P these are positions P-1 .. L-2 (|y| rows,
        the EOS position excluded), METHODS.md §5 (c). Float32 arrays of shape (|y|, d).
        Example: backend.hidden_states([ScoreItem(msgs, "Paris.")])[0].shape -> (4, 576)
        """
        import torch

        out: list[np.ndarray | None] = [None] * len(items)
        backbone = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.base_model
        with torch.inference_mode():
            for batch, rows, (ids, mask, positions), offsets in self._scored_batches(items):
                hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
                for b, (i, (row, start), offset) in enumerate(zip(batch, rows, offsets)):
                    out[i] = hidden[b, offset + start - 1: offset + len(row) - 1].float().cpu().numpy()
        return out  # type: ignore[return-value]

    # Generation -----------------------------------------------------------------------------
    streams_requests = True  # generate calls `on_done` as each batch finishes

    def generate(self, requests: list[ChatRequest],
                 on_done: Callable[[int, list[Completion]], None] | None = None) -> list[list[Completion]]:
        """Answer requests in length-sorted batches that share generation params.

        `on_done(i, completions)` is called for each request of a batch when the batch is done.
        Example: backend.generate([req])[0][0].text
        """
        import torch

        results: list[list[Completion]] = [[] for _ in requests]
        prompts = [encode_prompt(self.tokenizer, r.messages) for r in requests]
        groups: dict[Any, list[int]] = {}
        for i, request in enumerate(requests):
            if request.guided_choice or request.guided_regex:
                raise ValueError("structured output needs the vllm backend")
            groups.setdefault(request.params, []).append(i)
        for params, members in groups.items():
            lengths = [len(prompts[i]) for i in members]
            sampled = params.temperature > 0
            batches = [[j] for j in range(len(members))] if sampled else \
                length_batches(lengths, self.batch_tokens, self.max_rows)
            for batch in batches:
                idx = [members[j] for j in batch]
                ids, mask, _, _ = self._padded([prompts[i] for i in idx], "left")
                if sampled:  # one request per call: its own seed drives its sampler alone
                    torch.manual_seed(int(digest(str(requests[idx[0]].seed))[:8], 16))
                with torch.inference_mode():
                    generated = self.model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=params.max_tokens,
                        do_sample=sampled, temperature=params.temperature or None,
                        top_p=params.top_p if sampled else None, top_k=params.top_k if sampled else None,
                        repetition_penalty=params.repetition_penalty, num_return_sequences=params.n,
                        pad_token_id=self.pad_id, eos_token_id=self._stop_ids(),
                    )
                new = generated[:, ids.shape[1]:].cpu().tolist()
                for k, i in enumerate(idx):
                    results[i] = [self._completion(new[k * params.n + j], params, len(prompts[i])) for j in range(params.n)]
                    if on_done is not None:
                        on_done(i, results[i])
        return results

    def _stop_ids(self) -> list[int]:
        """Token ids that end a reply: the chat template's end-of-turn token and EOS."""
        ids = [end_of_turn_id(self.tokenizer), self.tokenizer.eos_token_id]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def _completion(self, tokens: list[int], params: Any, n_prompt: int) -> Completion:
        """Text and finish reason of one generated row (pads and the stop token stripped, stop strings applied)."""
        stops = set(self._stop_ids())
        finish = "length"
        end = next((k for k, t in enumerate(tokens) if t in stops), None)
        if end is not None:
            tokens = tokens[:end]
            finish = "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in params.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        return Completion(text, finish, len(tokens) + (1 if finish == "stop" else 0), n_prompt, self.name)

    def close(self) -> None:
        """Free the model. Example: backend.close()"""
        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "HFBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
