"""The tokenizer of an export: our tiktoken encoding as a Hugging Face fast tokenizer, checked
token for token on a fixed sample, and the lookup of the encoding a checkpoint was trained with."""
import base64
import tempfile
from pathlib import Path

from model.config import ModelConfig

from .errors import CheckpointError

TOKENIZER_SAMPLE = ("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n"
                    "The quick brown fox jumps over the lazy dog. 1234567 <|endoftext|> Ünïcödé — ✓")


def export_tokenizer(tokenizer, config: ModelConfig, out: Path) -> None:
    """tokenizer.json (+ tokenizer_config.json) from our tiktoken encoding, checked on a fixed sample."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    encoding = tokenizer.encoding
    if encoding.n_vocab > config.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer.id} has {encoding.n_vocab} tokens but model.vocab_size is "
                              f"{config.vocab_size}: the embedding cannot hold them; wrong --tokenizer?")
    specials = sorted(encoding._special_tokens.items(), key=lambda kv: kv[1])
    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "ranks.tiktoken"
        bpe.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                               for t, r in sorted(encoding._mergeable_ranks.items(), key=lambda kv: kv[1])))
        converted = TikTokenConverter(vocab_file=str(bpe), pattern=encoding._pat_str,
                                      extra_special_tokens=[t for t, _ in specials]).converted()
    for token, token_id in specials:
        if converted.token_to_id(token) != token_id:
            raise CheckpointError(f"special token {token!r} has id {token_id} in tiktoken but "
                                  f"{converted.token_to_id(token)} in the converted tokenizer (ids not contiguous)")
    eot = "<|endoftext|>" if "<|endoftext|>" in encoding._special_tokens else None
    fast = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=eot, bos_token=eot,
                                   model_max_length=1 << 30, clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    check_tokenizer(encoding, PreTrainedTokenizerFast.from_pretrained(str(out)))


def check_tokenizer(encoding, fast) -> None:
    for text in TOKENIZER_SAMPLE.split("\n") + [TOKENIZER_SAMPLE]:
        ours = encoding.encode(text, allowed_special="all")
        theirs = fast.encode(text, add_special_tokens=False)
        if ours != theirs:
            raise CheckpointError(f"exported tokenizer disagrees with tiktoken on {text!r}: {ours[:12]} vs {theirs[:12]}")
        if fast.decode(theirs) != text:
            raise CheckpointError(f"exported tokenizer does not round-trip {text!r}: got {fast.decode(theirs)!r}")


def load_tokenizer_for(common: dict, spec: str | None):
    from data_pipeline.manifest import read_manifest
    from data_pipeline.tokenizer import load_tokenizer

    if spec is None:
        data_path = common["config"]["data"]["path"]
        try:
            spec = read_manifest(data_path)["tokenizer"]["spec"]
        except FileNotFoundError as err:
            raise CheckpointError(f"cannot find the training data {data_path} to learn the tokenizer; "
                                  f"pass --tokenizer SPEC (tokenizer id {common['tokenizer_id']})") from err
    tokenizer = load_tokenizer(spec)
    if tokenizer.id != common["tokenizer_id"]:
        raise CheckpointError(f"tokenizer {spec!r} has id {tokenizer.id} but the checkpoint was trained with "
                              f"{common['tokenizer_id']}; pass the right --tokenizer")
    return tokenizer

