"""Reading and writing checkpoints and files: checked input files, the safetensors reader and hub
resolution, the page cache, read-ahead, LoRA adapters, the shard writer, safe outputs, atomic files
and locks, content digests."""
