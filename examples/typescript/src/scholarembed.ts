// A small scholarembed client on @grpc/grpc-js, built at run time from protos/ with @grpc/proto-loader:
// no code generation, no client library. docs/protocol.md describes everything used here.
import { once } from "node:events";
import { createReadStream } from "node:fs";
import { createInterface } from "node:readline";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

// Messages as proto-loader hands them over with the options below: field names as in the protos
// (keepCase), enums as their names, 64-bit integers as numbers, unset fields as their defaults.
export interface ModelInfo {
  model_id: string;
  dimensions: number;
  matryoshka_dimensions: number[];
  max_tokens: number;
  dtype: string;
  device: string;
  limits: { max_texts_per_request: number; max_message_bytes: number };
}

export interface Passage {
  id: string;
  text: string;
  title: string;
  metadata: Record<string, string>;
}

interface Embedding {
  data: Buffer;
  token_count: number;
  truncated: boolean;
}

interface EmbedResponse {
  embeddings: Embedding[];
  dimensions: number;
  encoding: string;
}

export interface RpcStatus {
  code: number;
  message: string;
}

interface UpsertPassagesResponse {
  request_id: string;
  upserted: number;
  error: RpcStatus | null;
}

/** Where a hybrid hit stood in one list: rank from 1, and that list's score (cosine or BM25). */
export interface ListRank {
  rank: number;
  score: number;
}

export interface Hit {
  id: string;
  /** Cosine (dense), BM25 (lexical) or the reciprocal-rank fusion score (hybrid). */
  score: number;
  /** Hybrid only: the place in the dense and lexical lists; null when not among a list's candidates. */
  dense: ListRank | null;
  lexical: ListRank | null;
}

export type SearchMode = "SEARCH_MODE_DENSE" | "SEARCH_MODE_LEXICAL" | "SEARCH_MODE_HYBRID";

/** One metadata condition (MetadataCondition): exactly one of equals, any_of, range. */
export interface MetadataCondition {
  key: string;
  equals?: string;
  any_of?: { values: string[] };
  range?: { gt?: number; gte?: number; lt?: number; lte?: number };
}

export interface SearchOptions {
  mode?: SearchMode;
  /** All must hold (AND), in every mode. */
  conditions?: MetadataCondition[];
  /** Hybrid: the k of reciprocal-rank fusion (0 = 60) and candidates per list (0 = max(100, topK)). */
  hybrid?: { rrf_k?: number; depth?: number };
}

interface SearchResponse {
  results: { hits: Hit[] }[];
}

/** One answer of the UpsertPassages stream: its request, and either `upserted` or an in-band `error`. */
export interface UpsertAck {
  requestId: string;
  ids: string[];
  upserted: number;
  error: { code: string; message: string } | null;
}

type Unary<Request, Response> = (
  request: Request,
  callback: (error: grpc.ServiceError | null, response?: Response) => void,
) => grpc.ClientUnaryCall;

interface EmbeddingServiceClient extends grpc.Client {
  GetModelInfo: Unary<Record<string, never>, ModelInfo>;
  Embed: Unary<object, EmbedResponse>;
}

interface SearchServiceClient extends grpc.Client {
  UpsertPassages(): grpc.ClientDuplexStream<object, UpsertPassagesResponse>;
  Search: Unary<object, SearchResponse>;
}

type ServiceConstructor = new (
  address: string,
  credentials: grpc.ChannelCredentials,
  options?: grpc.ChannelOptions,
) => grpc.Client;

/** The float32 layout of Embedding.data: 4 bytes per dimension, IEEE 754, little-endian. */
export function decodeFloat32(data: Uint8Array, dimensions: number): Float32Array {
  if (data.byteLength !== 4 * dimensions) {
    throw new Error(`expected ${4 * dimensions} bytes for ${dimensions} float32 values, got ${data.byteLength}`);
  }
  // DataView, not a Float32Array over the buffer: the bytes need not be 4-byte aligned, and the
  // wire is little-endian whatever this machine is.
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const vector = new Float32Array(dimensions);
  for (let i = 0; i < dimensions; i++) {
    vector[i] = view.getFloat32(4 * i, true);
  }
  return vector;
}

/** Passages from a JSONL file (`id` or BEIR's `_id`, `text`, optional `title` and `metadata`), read lazily. */
export async function* readPassages(path: string): AsyncGenerator<Passage> {
  const lines = createInterface({ input: createReadStream(path), crlfDelay: Infinity });
  for await (const line of lines) {
    if (!line.trim()) continue;
    const record = JSON.parse(line) as Record<string, unknown>;
    const metadata = (record.metadata ?? {}) as Record<string, unknown>;
    yield {
      id: String(record.id ?? record._id ?? ""),
      text: String(record.text ?? ""),
      title: String(record.title ?? ""),
      metadata: Object.fromEntries(Object.entries(metadata).map(([key, value]) => [key, String(value)])),
    };
  }
}

async function* chunks<T>(items: AsyncIterable<T>, size: number): AsyncGenerator<T[]> {
  let chunk: T[] = [];
  for await (const item of items) {
    chunk.push(item);
    if (chunk.length === size) {
      yield chunk;
      chunk = [];
    }
  }
  if (chunk.length) yield chunk;
}

function unary<Request, Response>(method: Unary<Request, Response>, request: Request): Promise<Response> {
  return new Promise((resolve, reject) => {
    method(request, (error, response) => {
      if (error) reject(new Error(`${grpc.status[error.code]}: ${error.details}`, { cause: error }));
      else resolve(response as Response);
    });
  });
}

export class ScholarEmbed {
  private readonly embedding: EmbeddingServiceClient;
  private readonly search: SearchServiceClient;

  /** `protos` is the folder holding scholarembed/v1/*.proto and google/rpc/status.proto. */
  constructor(address: string, protos: string) {
    const definition = protoLoader.loadSync(["scholarembed/v1/embedding.proto", "scholarembed/v1/search.proto"], {
      includeDirs: [protos],
      keepCase: true,
      enums: String,
      longs: Number, // uint64 counts stay far below 2^53
      defaults: true,
      arrays: true,
    });
    const v1 = grpc.loadPackageDefinition(definition).scholarembed as grpc.GrpcObject;
    const services = v1.v1 as Record<string, ServiceConstructor>;
    const credentials = grpc.credentials.createInsecure();
    const options = { "grpc.max_receive_message_length": 64 * 1024 * 1024 };
    const EmbeddingService = services.EmbeddingService as ServiceConstructor;
    const SearchService = services.SearchService as ServiceConstructor;
    this.embedding = new EmbeddingService(address, credentials, options) as EmbeddingServiceClient;
    this.search = new SearchService(address, credentials, options) as SearchServiceClient;
  }

  close(): void {
    this.embedding.close();
    this.search.close();
  }

  modelInfo(): Promise<ModelInfo> {
    return unary(this.embedding.GetModelInfo.bind(this.embedding), {});
  }

  /** One unit vector per text, in order. `dimensions` 0 = the model's full size. */
  async embed(
    texts: string[],
    inputType: "INPUT_TYPE_QUERY" | "INPUT_TYPE_PASSAGE",
    dimensions: number,
    titles: string[] = [],
  ): Promise<Float32Array[]> {
    const request = { texts, titles, input_type: inputType, dimensions, encoding: "ENCODING_FLOAT32" };
    const response = await unary(this.embedding.Embed.bind(this.embedding), request);
    return response.embeddings.map((embedding) => decodeFloat32(embedding.data, response.dimensions));
  }

  /**
   * Stream passages into a collection over one UpsertPassages call and wait for every acknowledgement.
   *
   * At most `window` requests are unanswered at a time (the server's default stream window is 8), and
   * grpc-js's own buffer is respected (`write()` false -> wait for `drain`), so memory stays flat. The
   * server answers each request once, in order, after its passages are durably stored; a bad request
   * is answered in-band with `error` and the stream goes on, so the result lists every request.
   */
  async upsert(
    collection: string,
    passages: AsyncIterable<Passage>,
    { batchSize = 64, window = 8 }: { batchSize?: number; window?: number } = {},
  ): Promise<UpsertAck[]> {
    const call = this.search.UpsertPassages();
    const unanswered: { requestId: string; ids: string[] }[] = [];
    const acks: UpsertAck[] = [];
    let failure: Error | null = null;
    let wake = (): void => {};
    const fail = (error: Error): void => {
      failure ??= error;
      wake();
    };
    call.on("data", (response: UpsertPassagesResponse) => {
      const sent = unanswered.shift();
      if (sent === undefined || response.request_id !== sent.requestId) {
        fail(new Error(`answer ${response.request_id} arrived out of order (expected ${sent?.requestId})`));
        call.cancel();
        return;
      }
      const error = response.error && {
        code: grpc.status[response.error.code] ?? String(response.error.code),
        message: response.error.message,
      };
      acks.push({ ...sent, upserted: response.upserted, error });
      wake();
    });
    call.on("error", fail); // the whole stream failed: a status other than OK
    const finished = new Promise<void>((resolve) => call.on("status", () => resolve()));

    let number = 0;
    for await (const batch of chunks(passages, batchSize)) {
      while (unanswered.length >= window && failure === null) {
        await new Promise<void>((resolve) => (wake = resolve));
      }
      if (failure !== null) break;
      const requestId = `${collection}-${number++}`;
      unanswered.push({ requestId, ids: batch.map((passage) => passage.id) });
      if (!call.write({ collection, request_id: requestId, passages: batch })) {
        await Promise.race([once(call, "drain"), finished]);
      }
    }
    call.end(); // half-close: the server answers what is outstanding, then ends the stream
    await finished;
    if (failure !== null) throw failure;
    if (unanswered.length > 0) throw new Error(`${unanswered.length} requests were never answered`);
    return acks;
  }

  /** The best `topK` passages of the collection for each query, best first, at `dimensions`. */
  async searchMany(
    collection: string,
    queries: string[],
    topK: number,
    dimensions: number,
    options: SearchOptions = {},
  ): Promise<Hit[][]> {
    const request = { collection, queries, top_k: topK, dimensions, ...options };
    const response = await unary(this.search.Search.bind(this.search), request);
    return response.results.map((result) =>
      result.hits.map(({ id, score, dense, lexical }) => ({ id, score, dense, lexical })),
    );
  }
}
