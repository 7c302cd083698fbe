"""The engine in parts, as vLLM splits worker and model runner and TEI splits core and backend.

    prompts.py       input types and prompt templates
    loading.py       a model folder or hub id -> an immutable LoadedModel (weights, tokenizer, prompts, pooling,
                     Dense, dimensions) and its one computation, `embed`
    tokenization.py  prompted texts -> token ids within the model's limit, from any thread
    buckets.py       static batch shapes (bucket lengths and row ladders)
    compilation.py   the repeated layer compiled once per bucket length (regional compilation)
    runner.py        token rows -> vectors on one device: padding, buckets, CUDA streams, compilation

Dependencies point down this list. `engine.EmbeddingEngine` puts a LoadedModel and a DeviceRunner together.
"""
