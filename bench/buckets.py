"""Padding efficiency of bucket-length sets on real SciFact text with the real Gemma 3 tokenizer.

    make bench-buckets                            # fetches the Gemma 3 tokenizer, then runs this
    python -m bench.buckets --tokenizer DIR       # DIR holds Gemma 3's tokenizer.json

Every bucket length is one compilation at start-up (the repeated layer, rows dynamic), and every token
of padding is compute thrown away. This weighs the two: for each candidate set of lengths it plans the
whole SciFact corpus (5,183 abstracts, title + text, EmbeddingGemma's passage prompt) and its 1,109
queries (query prompt) exactly as the server's batcher plans them, and prints the efficiency, real
tokens / computed tokens (dummy rows and padding included), per tail mode and token budget. The eager
path's sorted token budget (no static shapes, nothing to compile) is the ceiling.

Token counts are EmbeddingGemma's: its tokenizer is Gemma 3's (262,145 tokens) with <bos> and <eos>
around each text (`random_model.embeddinggemma_tokenizer`), capped at 2,048.
Efficiency counts tokens, not FLOPs: attention grows with the length, so long padding costs a little
more than it shows. Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from scholarembed_server.model.buckets import DEFAULT_BUCKET_LENGTHS, LengthBuckets, Tail
from scholarembed_server.model.prompts import EMBEDDINGGEMMA_PROMPTS, InputType
from scholarembed_server.model.runner import plan_batches
from scholarembed_server.random_model import embeddinggemma_tokenizer

REPO = Path(__file__).resolve().parent.parent
SCIFACT = REPO.parent / "shared" / "data" / "scifact"
MAX_TOKENS = 2048
CANDIDATES: dict[str, tuple[int, ...]] = {
    "2,048 only": (2048,),
    "256, 512, 2,048": (256, 512, 2048),
    "powers of two from 128": (128, 256, 512, 1024, 2048),
    "powers of two from 64": (64, 128, 256, 512, 1024, 2048),
    "former default (no 32)": tuple(length for length in DEFAULT_BUCKET_LENGTHS if length != 32),
    "default": DEFAULT_BUCKET_LENGTHS,
    "finer (x1.125 to 512)": (64, 72, 80, 96, 112, 128, 144, 160, 192, 224, 256, 288, 320, 384, 448, 512,
                              768, 1024, 1536, 2048),
}  # fmt: skip


def token_lengths(gemma3_dir: Path) -> dict[str, list[int]]:
    """Tokens per prompted passage and query, as EmbeddingGemma counts them (<bos> and <eos> included)."""
    from tokenizers import Tokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = Tokenizer.from_file(str(embeddinggemma_tokenizer(gemma3_dir, Path(folder)) / "tokenizer.json"))
    corpus = [json.loads(line) for line in (SCIFACT / "corpus.jsonl").open()]
    passages = EMBEDDINGGEMMA_PROMPTS.apply(
        [record["text"] for record in corpus], InputType.PASSAGE, [record.get("title", "") for record in corpus]
    )
    queries = EMBEDDINGGEMMA_PROMPTS.apply(
        [json.loads(line)["text"] for line in (SCIFACT / "queries.jsonl").open()], InputType.QUERY
    )
    return {
        name: [min(len(encoding.ids), MAX_TOKENS) for encoding in tokenizer.encode_batch(texts)]
        for name, texts in (("passages", passages), ("queries", queries))
    }


def eager_padded_tokens(lengths: list[int], budget: int) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in plan_batches(lengths, budget))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with Gemma 3's tokenizer.json")
    parser.add_argument("--budgets", default="16384,65536", help="padded-token budgets of a batch")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    if not (args.tokenizer / "tokenizer.json").exists():
        parser.error(f"no tokenizer.json in {args.tokenizer}: make bench-buckets fetches one")
    budgets = [int(budget) for budget in args.budgets.split(",")]
    lengths = token_lengths(args.tokenizer)
    summary = {name: (sum(values), sum(values) / len(values), max(values)) for name, values in lengths.items()}
    for name, (tokens, mean, longest) in summary.items():
        print(f"{name}: {len(lengths[name])}, {tokens} tokens, mean {mean:.0f}, longest {longest}")

    rows = []
    for name, candidate in CANDIDATES.items():
        for budget in budgets:
            for tail in Tail:
                buckets = LengthBuckets.create(candidate, max_tokens=MAX_TOKENS, max_batch_tokens=budget, tail=tail)
                row = {"buckets": name, "lengths": len(buckets.lengths), "budget": budget, "tail": tail.value}
                for kind, values in lengths.items():
                    row[kind] = sum(values) / buckets.padded_tokens(values)
                rows.append(row)
    for budget in budgets:
        row = {"buckets": "eager, sorted token budget", "lengths": 0, "budget": budget, "tail": "-"}
        rows.append(row | {kind: sum(values) / eager_padded_tokens(values, budget) for kind, values in lengths.items()})

    print(f"\n{'bucket lengths':28} {'compilations':>12} {'budget':>7} {'tail':>8} {'passages':>9} {'queries':>8}")
    for row in rows:
        print(f"{row['buckets']:28} {row['lengths']:>12} {row['budget']:>7} {row['tail']:>8} "
              f"{row['passages']:>9.3f} {row['queries']:>8.3f}")  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"buckets-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "tokenizer": str(args.tokenizer), "rows": rows}
    path.write_text(json.dumps(report | {"workload": summary}, indent=2))
    print(f"wrote {path}")
    from bench import plots  # matplotlib, only once there is something to draw

    plots.save(report, path)


if __name__ == "__main__":
    main()
