"""The distillation corpus: general-domain text, offline, and no text of any evaluation set.

    elasticlm corpus --out runs/corpus        # build the texts, then the teacher's embeddings (resumable)

Two steps, each kept in the corpus directory so that it runs once per corpus, not once per run:
  1. ``build_corpus``   texts from ``<data>/general`` (web-search queries, questions, Wikipedia-style
                        passages), WordNet's glosses and usage examples (Debian's ``wordnet-base``, which
                        the project's set-up installs), the GLUE *training* sentences and SciFact's *train*
                        queries, plus query-length spans cropped from the passages; every text that equals
                        (case- and whitespace-insensitive) a text of an evaluation set is dropped
                        (TREC DL 2019, SciFact's corpus and queries, the GLUE dev sets).
  2. ``TeacherCache``   the teacher's pooled, normalized embedding of every text, computed once in fp32
                        (768 bytes a text in fp16) with its token ids: a training step then needs no
                        teacher forward at all, and the relation loss can look at thousands of
                        cached neighbours instead of the batch.

Why so much text: the small SubLMs lose most on text the checkpoint never read, and every published
nested or layer-reduced encoder is distilled on millions of sentences (``shared/notes/elastic-encoders.md``).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .data import DEFAULT_DATA_DIR, _read_jsonl, _read_tsv, load_dl19, load_scifact

WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base (installed by `make setup`)
TEXTS_FILE = "texts.jsonl"
SUMMARY_FILE = "corpus.json"


def normalize(text: str) -> str:
    """The key two texts are 'the same' under: lower case, single spaces."""
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------- what no training text may equal
def evaluation_texts(data_dir: str | Path) -> set[str]:
    """Every query and passage this project evaluates on (normalized): TREC DL 2019, SciFact's corpus
    and test queries, and the dev sets of the GLUE tasks it reports."""
    data_dir = Path(data_dir)
    held_out: set[str] = set()
    queries, passages, _, _ = load_dl19(data_dir, system=None)
    held_out |= {normalize(t) for t in [*queries.values(), *passages.values()]}
    scifact = Path(data_dir) / "beir" / "scifact"
    for doc in _read_jsonl(scifact / "corpus.jsonl"):
        held_out |= {normalize(doc["text"]), normalize((doc.get("title", "") + " " + doc["text"]).strip())}
    held_out |= {normalize(q) for q in load_scifact(data_dir, split="test").queries.values()}
    for task, columns in GLUE_COLUMNS.items():
        for row in _read_tsv(data_dir / "glue" / task / "dev.tsv"):
            held_out |= {normalize(row[c]) for c in columns}
    return held_out


GLUE_COLUMNS = {"SST-2": ("sentence",), "MRPC": ("#1 String", "#2 String"), "RTE": ("sentence1", "sentence2")}


# --------------------------------------------------------------------------- sources
def general_texts(data_dir: Path) -> dict[str, list[str]]:
    root = data_dir / "general"
    return {"general_queries": [r["text"] for r in _read_jsonl(root / "queries.jsonl")],
            "general_passages": [r["text"] for r in _read_jsonl(root / "passages.jsonl")]}


def glue_train_texts(data_dir: Path) -> dict[str, list[str]]:
    """GLUE training sentences, uncapped (their labels are never read)."""
    return {f"glue_{task.lower().replace('-', '')}_train":
            [row[c] for row in _read_tsv(data_dir / "glue" / task / "train.tsv") for c in columns]
            for task, columns in GLUE_COLUMNS.items()}


def scifact_train_queries(data_dir: Path) -> dict[str, list[str]]:
    """SciFact's *train* queries (its corpus and test queries are evaluation text)."""
    return {"scifact_train_queries": list(load_scifact(data_dir, split="train").queries.values())}


_WORDNET_LINE = re.compile(r"^\d{8} ")


def wordnet_texts(wordnet_dir: Path = WORDNET_DIR) -> dict[str, list[str]]:
    """WordNet 3.0 synsets as retrieval-shaped text: a definitional query per synset ("what is X" /
    "X meaning"), its gloss with the head word as a short passage, and each usage example as a
    sentence. Empty where the package is missing (the corpus records what it read)."""
    queries, glosses, examples = [], [], []
    for pos in ("noun", "verb", "adj", "adv"):
        path = wordnet_dir / f"data.{pos}"
        if not path.exists():
            continue
        for n, line in enumerate(open(path, encoding="utf-8", errors="replace")):
            if not _WORDNET_LINE.match(line) or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            word = fields.split()[4].replace("_", " ")
            word = re.sub(r"\(.*?\)$", "", word)  # adjective markers such as (a), (p)
            parts = [p.strip() for p in gloss.strip().split(";")]
            definition = "; ".join(p for p in parts if not p.startswith('"'))
            usage = [p.strip('" ') for p in parts if p.startswith('"')]
            if not definition:
                continue
            queries.append(f"what is {word}" if pos == "noun" and n % 2 else f"{word} meaning")
            glosses.append(f"{word}: {definition}")
            examples += [u for u in usage if len(u.split()) >= 3]
    return {"wordnet_queries": queries, "wordnet_glosses": glosses, "wordnet_examples": examples}


def cropped_spans(passages: list[str], rng: random.Random, min_words: int = 4, max_words: int = 12) -> list[str]:
    """One query-length span per passage, at a random place: most web queries are 3-10 words, and the
    small SubLMs serve queries far more often than passages."""
    spans = []
    for passage in passages:
        words = passage.split()
        if len(words) < min_words + 2:
            continue
        n = rng.randint(min_words, min(max_words, len(words)))
        start = rng.randint(0, len(words) - n)
        spans.append(" ".join(words[start:start + n]))
    return spans


# --------------------------------------------------------------------------- 1. the texts
def build_corpus(data_dir: str | Path = DEFAULT_DATA_DIR, out_dir: str | Path = "runs/corpus", seed: int = 0,
                 wordnet_dir: Path = WORDNET_DIR) -> dict:
    """Write ``texts.jsonl`` (``{"text", "source"}``, deduplicated, shuffled) and ``corpus.json`` (counts
    per source, what the evaluation filter removed). Returns the summary."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    rng = random.Random(seed)
    sources = general_texts(data_dir)
    sources["passage_crops"] = cropped_spans(sources["general_passages"], rng)
    sources |= glue_train_texts(data_dir) | scifact_train_queries(data_dir) | wordnet_texts(wordnet_dir)

    held_out = evaluation_texts(data_dir)
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    removed = Counter()
    for name in sorted(sources):
        for text in sources[name]:
            text = " ".join(text.split())
            key = normalize(text)
            if not key:
                continue
            if key in held_out:
                removed[name] += 1
            elif key not in seen:
                seen.add(key)
                kept.append((text, name))
    rng.shuffle(kept)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / TEXTS_FILE, "w", encoding="utf-8") as f:
        for text, name in kept:
            f.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
    summary = {"texts": len(kept), "sources": dict(sorted(Counter(n for _, n in kept).items())),
               "removed_as_evaluation_text": dict(sorted(removed.items())),
               "held_out": ["trec-dl-2019 queries and passages", "scifact corpus and queries",
                            "glue dev (sst2, mrpc, rte)"],
               "data_dir": str(data_dir), "seed": seed}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def read_corpus(corpus_dir: str | Path) -> tuple[list[str], list[str]]:
    """(texts, source of each) as ``build_corpus`` wrote them."""
    texts, sources = [], []
    for record in _read_jsonl(Path(corpus_dir) / TEXTS_FILE):
        texts.append(record["text"])
        sources.append(record["source"])
    return texts, sources


# --------------------------------------------------------------------------- 2. the teacher's outputs, once
class TeacherCache:
    """Token ids (flat int32 + offsets) and the teacher's fp16 embeddings of a corpus, on disk.

    Filled in blocks, each written atomically, so an interrupted build resumes where it stopped.
    """

    BLOCK = 8192

    def __init__(self, corpus_dir: str | Path, max_length: int, teacher_id: str | None = None):
        """``teacher_id``: another teacher than the shipped one (an elastic checkpoint's weights id, as
        ``adapt --distil-from checkpoint`` uses) keeps its outputs apart from the shipped teacher's."""
        self.dir = Path(corpus_dir) / (f"teacher-{teacher_id}-len{max_length}" if teacher_id
                                       else f"teacher-len{max_length}")
        self.max_length = max_length

    @property
    def complete(self) -> bool:
        return (self.dir / "embeddings.npy").exists()

    def build(self, texts: list[str], tokenizer, teacher, progress: bool = True, batch_tokens: int = 4096,
              bf16: bool | None = None):
        """``bf16``: autocast the teacher's matmuls (AMX / tensor cores): 2.1x faster on an AMX CPU, and the
        embeddings keep a cosine >= 0.99994 to fp32's (measured over 2,048 corpus texts). Default: where the
        device multiplies bf16 natively (``precision.native_bf16``); elsewhere it is several times slower."""
        import torch
        from tqdm.auto import tqdm

        from .batching import Chunking, run_chunked
        from .precision import native_bf16

        if bf16 is None:
            bf16 = native_bf16(teacher.word_embeddings.weight.device.type)

        if self.complete:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        blocks = range(0, len(texts), self.BLOCK)
        bar = tqdm(total=len(texts), desc="teacher embeddings", unit="text", disable=not progress)
        for start in blocks:
            part = self.dir / f"block-{start:08d}.npz"
            if part.exists():
                bar.update(min(self.BLOCK, len(texts) - start))
                continue
            ids = tokenizer(texts[start:start + self.BLOCK], truncation=True, max_length=self.max_length)["input_ids"]
            with torch.inference_mode(), torch.autocast(teacher.word_embeddings.weight.device.type,
                                                        dtype=torch.bfloat16, enabled=bf16):
                emb = run_chunked(ids, lambda b: teacher.embed(b["input_ids"], b["attention_mask"], packed=True),
                                  tokenizer.pad_token_id, Chunking(max_texts=128, max_tokens=batch_tokens),
                                  progress=bar)
            lengths = np.array([len(x) for x in ids], dtype=np.int32)
            tmp = part.with_suffix(".tmp.npz")
            np.savez(tmp, tokens=np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]), lengths=lengths,
                     embeddings=emb.astype(np.float16))
            tmp.replace(part)
        bar.close()
        self._merge(len(texts))
        return self

    def _merge(self, n: int):
        parts = [np.load(p) for p in sorted(self.dir.glob("block-*.npz"))]
        lengths = np.concatenate([p["lengths"] for p in parts])
        if len(lengths) != n:
            raise RuntimeError(f"teacher cache holds {len(lengths)} texts, the corpus {n}: rebuild it")
        np.save(self.dir / "tokens.npy", np.concatenate([p["tokens"] for p in parts]))
        np.save(self.dir / "lengths.npy", lengths)
        np.save(self.dir / "embeddings.npy", np.concatenate([p["embeddings"] for p in parts]))  # last: marks complete
        for p in self.dir.glob("block-*.npz"):
            p.unlink()

    def load(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(token ids per text, lengths, fp16 embeddings [N, hidden])."""
        tokens = np.load(self.dir / "tokens.npy")
        lengths = np.load(self.dir / "lengths.npy")
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
        return ids, lengths, np.load(self.dir / "embeddings.npy")
