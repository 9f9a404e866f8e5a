"""Raw text -> tiktoken ids -> packed webdataset shards -> exactly resumable batches.

    python -m data_pipeline prepare --source builtin --tokenizer pydocs4k --seq-len 1024 --out data/pydocs

Modules, in data-flow order (see README.md in this folder):
  tokenizer        load_tokenizer(spec) -> Tokenizer (offline standard encodings, own .tiktoken BPEs)
  train_tokenizer  train our own BPE with rustbpe
  readers          corpus readers: JSONL, text files/dirs, Parquet, the built-in corpus
  tasks            task files (TSV/CSV/JSONL prompt + answer), encode_example, label sets
  synthetic/       seeded long-range task generators (MQAR, diffuse MQAR, two-style, passkey, copying)
  packing          documents -> (seq_len + 1)-token samples with boundaries and loss masks; tar entry layout
  prepare          prepare(...): parallel tokenisation, packing, ShardWriter, manifest.json
  parts            the sources cut into pieces at line starts, and pieces into parts (prepare --part I/N)
  merge            merge(dir): one manifest over the part directories, checked equal
  manifest         read_manifest(dir) and the manifest format
  schedule         which sample each rank/worker reads per epoch; resume and re-deal arithmetic
  shards           reading and checking tar entries (local or any webdataset URL)
  loader           build_dataloader(...) -> StatefulDataLoader; merge_dp_states(...)
  mixture          build_mixture_loader(sources, ...): weighted sources, per-source cursors; merge_mixture_states

Nothing here imports torch at package import time: tokeniser worker processes start fast.
"""
