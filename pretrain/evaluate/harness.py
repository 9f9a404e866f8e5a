"""The lm-evaluation-harness (0.4.x) model `sessa`: any TARGET of `python -m pretrain.evaluate`.

    python -m pretrain.evaluate lm-eval --model sessa --model_args pretrained=runs/NAME --tasks ...
    python -m pretrain.evaluate install-lm-eval     # once per environment, then:
    lm_eval --model sessa --model_args pretrained=DIR[,step=N,tokenizer=SPEC,max_length=N] --tasks ...

lm-eval 0.4.x finds models only in its own registry (no entry-point discovery), so `install-lm-eval`
writes a `.pth` file into this interpreter's site-packages: it puts the repository on sys.path and
adds an import hook that registers `sessa` lazily, right after `lm_eval.models` fills the registry
(nothing is imported at interpreter start-up).

Requests are scored by `scoring.py`, the same code as our own tasks: `loglikelihood` (batched by
length, continuation split at the context's last token as lm-eval's HF model does),
`loglikelihood_rolling` (lm-eval's disjoint windows of `max_length`), `generate_until` (greedy,
prompts of equal length decoded together from the decoding cache, cut at the `until` strings).
"""
import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .scoring import greedy_generate, score_continuations
from .targets import load_target

DEFAULT_MAX_GEN_TOKS = 256


@register_model("sessa")
class SessaEvalLM(LM):
    def __init__(self, pretrained: str, step: int | None = None, tokenizer: str | None = None,
                 device: str | None = None, batch_size=None, max_length: int | None = None, **_ignored):
        super().__init__()
        import torch

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's --device defaults to cuda
        self.target = load_target(pretrained, step=None if step is None else int(step), tokenizer_spec=tokenizer,
                                  device=device)
        self.model, self.tok = self.target.model, self.target.tokenizer
        self.max_length = int(max_length) if max_length else (self.target.info.get("seq_len") or 2048)
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else 32

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    def tok_encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as lm-eval's HF model splits them: trailing spaces of
        the context move to the continuation, the pair is encoded whole and split at the context."""
        if not context:
            return [self.eot_token_id], self.tok_encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole, context_ids = self.tok_encode(context + continuation), self.tok_encode(context)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*request.args) for request in requests]
        scores = score_continuations(self.model, pairs, max_length=self.max_length)
        return [(s.loglikelihood, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        pairs, owner = [], []
        for i, request in enumerate(requests):
            windows = get_rolling_token_windows(token_list=self.tok_encode(request.args[0]),
                                                prefix_token=self.eot_token_id, max_seq_len=self.max_length,
                                                context_len=1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(owner, score_continuations(self.model, pairs, max_length=self.max_length)):
            totals[i] += score.loglikelihood
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}  # same stop strings and length limit decode together
        for i, request in enumerate(requests):
            kwargs = dict(request.args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            groups.setdefault((tuple(until), int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))), []).append(i)
        out = [""] * len(requests)
        for (until, max_gen), members in groups.items():
            prompts = [self.tok_encode(requests[i].args[0])[-self.max_length:] or [self.eot_token_id]
                       for i in members]
            generated = greedy_generate(self.model, prompts, max_gen, eos_id=self.eot_token_id,
                                        batch_size=self.batch_size)
            for i, ids in zip(members, generated):
                text = self.tok.decode(ids)
                for stop in until:
                    text = text.split(stop)[0]
                out[i] = text
        return out


def run_lm_eval(argv: list[str]) -> int:
    """The lm_eval CLI with `sessa` registered (this module is imported, so the decorator ran)."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
