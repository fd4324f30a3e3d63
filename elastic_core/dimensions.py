"""Reduced embedding sizes (OpenAI's ``dimensions``) for a checkpoint that was not trained Matryoshka-style.

The checkpoint's embeddings cannot simply be cut: its coordinates are not ordered by importance. So
``elasticlm dimensions`` (``fit_dimensions``) fits an orthogonal rotation ``R`` of the embedding space, the
principal axes of embeddings of general training text (the distillation corpus, never evaluation text),
under which the first coordinates carry the most of the variance; a reduced size ``d`` is then
``normalize((e @ R)[:, :d])``. Training-free, so it is refitted in minutes for every new checkpoint.
(Measured on the first checkpoint, SciFact test, w100: the raw cut keeps 79% / 60% of each query's full-size
top 10 at 256 / 128 floats, these axes 95% / 72%; centered axes, or axes of the checkpoint's own embeddings,
kept the same within 1%, so the free fit on the teacher's cached embeddings is the one used.)
``R`` is orthogonal, so cosine similarities at full size are what they were without it: the full size is
served exactly as before (no rotation, bit for bit), and only a declared smaller size is rotated and cut.

A checkpoint declares the sizes it was fitted and measured for in ``dimensions.safetensors`` beside its
weights (the rotation, plus each size's measured retrieval quality in the file's metadata). Any other size
is refused; a checkpoint without the file declares none, and only its full size is served.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DIMENSIONS_FILE = "dimensions.safetensors"


@dataclass
class Dimensions:
    """The embedding sizes a checkpoint serves: ``full`` always, and each declared ``size`` < full with its
    measured quality (``sizes[d]``: e.g. NDCG@10 per SubLM and its ratio to the full size)."""

    full: int
    rotation: np.ndarray | None = None           # (full, full), orthogonal; None: no reduced size declared
    sizes: dict[int, dict] = field(default_factory=dict)
    fit: dict = field(default_factory=dict)      # how R was fitted and the quality measured (for /info, docs)

    @property
    def allowed(self) -> list[int]:
        """Every size a request may ask for, largest first."""
        return [self.full] + sorted(self.sizes, reverse=True)

    def refusal(self, dimensions) -> str | None:
        """Why ``dimensions`` cannot be served, or None when it can (None or the full size: unchanged)."""
        if dimensions is None or (isinstance(dimensions, int) and not isinstance(dimensions, bool)
                                  and dimensions in self.allowed):
            return None
        return f"dimensions must be one of {self.allowed} (the sizes this model declares), got {dimensions!r}"

    def reduce(self, embeddings: np.ndarray, dimensions: int | None) -> np.ndarray:
        """The rows at ``dimensions``: unchanged at full size (or None), else rotated, cut and re-normalized."""
        if dimensions is None or dimensions == self.full:
            return embeddings
        if dimensions not in self.sizes:
            raise ValueError(self.refusal(dimensions))
        rows = np.asarray(embeddings, dtype=np.float32) @ self.rotation[:, :dimensions]
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    def info(self) -> dict:
        """The ``/info`` entry: the sizes a request may ask for and each reduced size's measured quality."""
        return {"dimensions": self.allowed, "full_dimensions": self.full,
                "reduced_dimensions": {str(d): self.sizes[d] for d in sorted(self.sizes, reverse=True)},
                **({"dimensions_fit": self.fit} if self.fit else {})}

    # ----------------------------------------------------------------- the checkpoint's file
    @classmethod
    def load(cls, ckpt_dir: str | Path, full: int) -> "Dimensions":
        """The checkpoint's declared sizes; none (full size only) when it has no ``dimensions.safetensors``."""
        path = Path(ckpt_dir) / DIMENSIONS_FILE
        if not path.exists():
            return cls(full)
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            rotation = f.get_tensor("rotation").astype(np.float32)
            meta = f.metadata() or {}
        if rotation.shape != (full, full):
            raise ValueError(f"{path}: rotation of shape {rotation.shape}, the model's embeddings have {full} "
                             "dimensions: refit it (elasticlm dimensions)")
        sizes = {int(d): q for d, q in json.loads(meta.get("sizes", "{}")).items()}
        return cls(full, rotation, sizes, json.loads(meta.get("fit", "{}")))

    def save(self, ckpt_dir: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(ckpt_dir) / DIMENSIONS_FILE
        save_file({"rotation": np.ascontiguousarray(self.rotation, dtype=np.float32)}, str(path),
                  metadata={"sizes": json.dumps({str(d): q for d, q in self.sizes.items()}),
                            "fit": json.dumps(self.fit)})
        return path


def principal_axes(embeddings: np.ndarray, centered: bool) -> np.ndarray:
    """The orthogonal rotation whose columns are the principal axes of ``embeddings``, largest variance
    first: eigenvectors of the (centered or uncentered) second-moment matrix, computed in float64."""
    x = np.asarray(embeddings, dtype=np.float64)
    if centered:
        x = x - x.mean(axis=0)
    values, vectors = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(values)[::-1]
    return vectors[:, order].astype(np.float32)


# --------------------------------------------------------------------------- fitting and measuring (the command)
CANDIDATE_SIZES = (256, 192, 128, 96, 64, 32)


def corpus_sample(corpus_dir: str | Path, n: int, seed: int = 0, max_length: int = 128):
    """A seeded sample of the distillation corpus (``corpus.TeacherCache``): the teacher's embeddings (fp32)
    and the token ids of the same texts."""
    from .corpus import TeacherCache

    cache = TeacherCache(corpus_dir, max_length)
    if not cache.complete:
        raise FileNotFoundError(f"no teacher cache in {cache.dir}: build it (elasticlm corpus, then a training run)")
    embeddings = np.load(cache.dir / "embeddings.npy", mmap_mode="r")
    rows = np.sort(np.random.default_rng(seed).choice(len(embeddings), min(n, len(embeddings)), replace=False))
    lengths = np.load(cache.dir / "lengths.npy")
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    tokens = np.load(cache.dir / "tokens.npy", mmap_mode="r")
    ids = [tokens[offsets[i]:offsets[i + 1]].tolist() for i in rows]
    return np.asarray(embeddings[rows], dtype=np.float32), ids


def held_out_sets(data_dir, scifact_max_docs: int | None, dl19: bool, seed: int = 0) -> dict:
    """name -> (queries, docs, qrels, rank): SciFact test retrieval over a seeded sample of its corpus
    (every judged doc kept, as ``benchmarks/ladder.py --scifact-max-docs``) and, with ``dl19``, TREC DL
    2019's BM25 top-100 reranked (``eval.eval_dl19_dense``). No checkpoint trains on either."""
    from .data import load_dl19, load_scifact, subsample_corpus
    from .eval import candidate_run, dense_run

    ds = subsample_corpus(load_scifact(data_dir, "test"), scifact_max_docs, seed)
    sets = {"scifact": (ds.queries, ds.corpus, ds.qrels, dense_run)}
    if dl19:
        queries, passages, candidates, qrels = load_dl19(data_dir, system="BM25")
        docs = {p: passages[p] for cands in candidates.values() for p in cands if p in passages}
        sets["dl19"] = (queries, docs, {q: qrels[q] for q in queries}, candidate_run(candidates))
    return sets


def top10_overlap(full_run: dict, run: dict) -> float:
    """How much of each query's full-size top 10 a reduced size keeps (no judgments: less noisy than NDCG)."""
    def top(ranked):
        return set(sorted(ranked, key=ranked.get, reverse=True)[:10])
    return float(np.mean([len(top(full_run[q]) & top(run[q])) / len(top(full_run[q])) for q in full_run]))


def measure_sizes(denser, sets: dict, rotations: dict[str, np.ndarray], sizes, progress: bool = True) -> dict:
    """Per set and SubLM: NDCG@10 at full size, and for each rotation and size its NDCG@10 and its top-10
    overlap with the full size's ranking; queries and documents both at that size. Each SubLM encodes each
    set once, and the sizes are cut from its full-size rows, as the server does."""
    from tqdm.auto import tqdm

    from .eval import ndcg_at_10

    result: dict = {}
    for name, (queries, docs, qrels, rank) in sets.items():
        q_ids, d_ids = list(queries), list(docs)
        q_tok = denser.tokenize(list(queries.values()))["input_ids"]
        d_tok = denser.tokenize(list(docs.values()))["input_ids"]
        bar = tqdm(total=len(denser.sublms) * (len(q_tok) + len(d_tok)), desc=f"dimensions: {name}", unit="text",
                   disable=not progress)
        for sublm in denser.sublms:
            q_emb, d_emb = (denser.encode_tokenized(t, sublm, progress=bar) for t in (q_tok, d_tok))
            full_run = rank(q_ids, q_emb, d_ids, d_emb)
            row = {"full": ndcg_at_10(qrels, full_run)}
            for fit, rotation in rotations.items():
                cut = Dimensions(rotation.shape[0], rotation, dict.fromkeys(sizes, {}))
                row[fit] = {}
                for d in sizes:
                    run = rank(q_ids, cut.reduce(q_emb, d), d_ids, cut.reduce(d_emb, d))
                    row[fit][d] = {"ndcg@10": ndcg_at_10(qrels, run), "top10_overlap": top10_overlap(full_run, run)}
            result.setdefault(name, {})[sublm] = row
        bar.close()
    return result


def fit_dimensions(checkpoint: str | Path, corpus_dir: str | Path, data_dir: str | Path,
                   sizes=CANDIDATE_SIZES, centered: bool = False, fit_texts: int = 50_000,
                   scifact_max_docs: int | None = 1500, dl19: bool = True, min_ratio: float = 0.9,
                   compare: bool = False, own_texts: int = 4000, seed: int = 0,
                   progress: bool = True) -> tuple[Dimensions, dict]:
    """Fits ``R`` on the teacher's cached embeddings of ``fit_texts`` corpus texts (the checkpoint was
    distilled into the teacher's space, and this costs no forward pass), measures every candidate size on
    the held-out sets for every SubLM, and declares the sizes whose w100 NDCG@10 is at least ``min_ratio``
    of its full size's on every set. ``compare`` also measures, for the record, the fits this one was
    chosen over: centered or not, on the checkpoint's own w100 embeddings of ``own_texts`` corpus texts
    (uncentered: cosine similarity is, so the uncentered second moment is what a cut must keep), and no
    rotation at all. Returns the checkpoint's ``Dimensions`` (not yet saved) and the report."""
    from .denser import ElasticDenser

    denser = ElasticDenser.from_checkpoint(checkpoint)
    full, w100 = denser.model.config.hidden_size, denser.sublms[0]
    sizes = sorted((d for d in sizes if 0 < d < full), reverse=True)
    teacher, ids = corpus_sample(corpus_dir, fit_texts, seed)
    chosen = "teacher-centered" if centered else "teacher-uncentered"
    rotations = {chosen: principal_axes(teacher, centered)}
    if compare:
        own = denser.encode_tokenized(ids[:own_texts], w100) if own_texts else None
        for kind in ("uncentered", "centered"):
            rotations.setdefault(f"teacher-{kind}", principal_axes(teacher, kind == "centered"))
            if own is not None:
                rotations[f"own-{kind}"] = principal_axes(own, kind == "centered")
        rotations["none"] = np.eye(full, dtype=np.float32)  # the raw coordinates cut: what not to do
    sets = held_out_sets(data_dir, scifact_max_docs, dl19, seed)
    measured = measure_sizes(denser, sets, rotations, sizes, progress)

    def figures(d: int, key: str, vs_full: bool = False) -> dict:
        return {s: {sublm: round(row[chosen][d][key] / (row["full"] or 1) if vs_full else row[chosen][d][key], 4)
                    for sublm, row in by_sublm.items()} for s, by_sublm in measured.items()}

    quality = {d: {"ndcg@10": figures(d, "ndcg@10"), "vs_full": figures(d, "ndcg@10", True),
                   "top10_overlap": figures(d, "top10_overlap")} for d in sizes}
    declared = {d: q for d, q in quality.items() if all(r[w100] >= min_ratio for r in q["vs_full"].values())}
    fit = {"method": f"principal axes ({chosen.split('-')[1]}) of the teacher's embeddings of {len(teacher):,} "
                     "texts of the distillation corpus (no evaluation text)",
           "measured_on": {s: f"{len(q)} queries over {len(docs)} documents" for s, (q, docs, _, _) in sets.items()},
           "full_size_ndcg@10": {s: {sublm: round(row["full"], 4) for sublm, row in by_sublm.items()}
                                 for s, by_sublm in measured.items()},
           "rule": f"declared: {w100}'s NDCG@10 >= {min_ratio}x its full size's on every set"}
    report = {"checkpoint": str(checkpoint), "full": full, "fit": fit, "declared": sorted(declared, reverse=True),
              "candidates": quality, "chosen": chosen, "measured": measured}
    return Dimensions(full, rotations[chosen], declared, fit), report


def format_dimensions_table(report: dict) -> str:
    """Rows: the full size, then each candidate size; cells: NDCG@10 (its ratio to the same SubLM's full
    size) per set and SubLM, for the served fit."""
    fit = report["fit"]
    columns = [(s, sublm) for s, by_sublm in fit["full_size_ndcg@10"].items() for sublm in by_sublm]
    lines = ["| size | declared | " + " | ".join(f"{s} {sublm}" for s, sublm in columns) + " |",
             "|---|---|" + "---|" * len(columns),
             f"| {report['full']} (full) | yes | "
             + " | ".join(f"{fit['full_size_ndcg@10'][s][sublm]:.4f}" for s, sublm in columns) + " |"]
    for d, q in report["candidates"].items():
        cells = [f"{q['ndcg@10'][s][sublm]:.4f} ({q['vs_full'][s][sublm]:.3f})" for s, sublm in columns]
        lines.append(f"| {d} | {'yes' if int(d) in report['declared'] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
