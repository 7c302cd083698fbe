// scholarembed from TypeScript: model info, query and passage vectors, a streamed corpus, a search.
//
//   node dist/main.js 127.0.0.1:50051 --corpus corpus.jsonl --query "graphene band gap" \
//       --dimensions 256 --collection papers --out result.json
//
// Exit status: 0 when every step succeeded, 1 when some upsert request was refused in-band (the rest
// of the corpus is still stored and searched), 2 on any other failure.
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import { type MetadataCondition, type Passage, readPassages, ScholarEmbed, type SearchMode } from "./scholarembed.js";

const USAGE = `usage: main.js ADDRESS --corpus FILE.jsonl --query TEXT [--query TEXT ...]
  [--dimensions N (0 = full)] [--collection NAME] [--batch-size N] [--window N] [--top-k N]
  [--mode dense|lexical|hybrid] [--min-year N] [--venue V ...] [--out FILE.json] [--protos DIR]`;

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    corpus: { type: "string" },
    query: { type: "string", multiple: true, default: [] },
    dimensions: { type: "string", default: "0" },
    collection: { type: "string", default: "typescript-example" },
    "batch-size": { type: "string", default: "64" },
    window: { type: "string", default: "8" },
    "top-k": { type: "string", default: "5" },
    mode: { type: "string", default: "dense" },
    "min-year": { type: "string" },
    venue: { type: "string", multiple: true, default: [] },
    out: { type: "string" },
    protos: { type: "string", default: fileURLToPath(new URL("../../../protos", import.meta.url)) },
  },
});
const address = positionals[0];
if (address === undefined || values.corpus === undefined || values.query.length === 0) {
  console.error(USAGE);
  process.exit(2);
}
const corpus = values.corpus;
const queries = values.query;
const dimensions = Number(values.dimensions);
const collection = values.collection;
const mode = `SEARCH_MODE_${values.mode.toUpperCase()}` as SearchMode;
// Metadata values are strings; a range reads them as numbers ("2021" >= 2020).
const conditions: MetadataCondition[] = [];
if (values["min-year"] !== undefined) conditions.push({ key: "year", range: { gte: Number(values["min-year"]) } });
if (values.venue.length > 0) conditions.push({ key: "venue", any_of: { values: values.venue } });

async function collect<T>(items: AsyncIterable<T>): Promise<T[]> {
  const result: T[] = [];
  for await (const item of items) result.push(item);
  return result;
}

async function main(): Promise<number> {
  const client = new ScholarEmbed(address as string, values.protos);
  try {
    const info = await client.modelInfo();
    console.log(`model ${info.model_id}: ${info.dimensions} dimensions (Matryoshka: ${info.matryoshka_dimensions})`);
    if (dimensions !== 0 && !info.matryoshka_dimensions.includes(dimensions)) {
      throw new Error(`--dimensions ${dimensions} is not one of ${info.matryoshka_dimensions}`);
    }

    const queryVectors = await client.embed(queries, "INPUT_TYPE_QUERY", dimensions);
    const passages: Passage[] = await collect(readPassages(corpus));
    const passageVectors: Float32Array[] = [];
    const perRequest = info.limits.max_texts_per_request;
    for (let start = 0; start < passages.length; start += perRequest) {
      const chunk = passages.slice(start, start + perRequest);
      const vectors = await client.embed(
        chunk.map((p) => p.text),
        "INPUT_TYPE_PASSAGE",
        dimensions,
        chunk.map((p) => p.title),
      );
      passageVectors.push(...vectors);
    }
    const width = queryVectors[0]?.length ?? 0;
    console.log(`embedded ${queries.length} queries and ${passages.length} passages at ${width} dimensions`);
    queryVectors.forEach((vector, q) => {
      const norm = Math.hypot(...vector);
      const head = Array.from(vector.subarray(0, 4), (value) => value.toFixed(4)).join(", ");
      console.log(`  "${queries[q]}": [${head}, ...] (norm ${norm.toFixed(4)})`);
    });

    const acks = await client.upsert(collection, readPassages(corpus), {
      batchSize: Number(values["batch-size"]),
      window: Number(values.window),
    });
    for (const ack of acks) {
      if (ack.error) console.log(`  ${ack.requestId}: refused, ${ack.error.code}: ${ack.error.message}`);
    }
    const stored = acks.reduce((sum, ack) => sum + ack.upserted, 0);
    const refused = acks.filter((ack) => ack.error !== null);
    console.log(
      `upserted ${stored} passages into "${collection}" in ${acks.length} requests (${refused.length} refused)`,
    );

    const hits = await client.searchMany(collection, queries, Number(values["top-k"]), dimensions, {
      mode,
      conditions,
    });
    hits.forEach((queryHits, q) => {
      const listed = queryHits.map((hit) => `${hit.id} ${hit.score.toFixed(4)}`).join(", ");
      console.log(`  "${queries[q]}": ${listed}`);
    });

    if (values.out !== undefined) {
      const result = {
        model: info,
        dimensions: width,
        queries: { texts: queries, vectors: queryVectors.map((v) => Array.from(v)) },
        passages: { ids: passages.map((p) => p.id), vectors: passageVectors.map((v) => Array.from(v)) },
        upserts: acks,
        search: hits,
      };
      writeFileSync(values.out, JSON.stringify(result));
    }
    return refused.length > 0 ? 1 : 0;
  } finally {
    client.close();
  }
}

main().then(
  (code) => process.exit(code),
  (error: unknown) => {
    console.error(error instanceof Error ? error.message : error);
    process.exit(2);
  },
);
