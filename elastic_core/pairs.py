"""The one truncation rule for (query, passage) pairs: training, evaluation and serving all encode through it.

A pair over the token limit keeps its query whole and loses the passage's tail (``only_second``, what
rerankers are trained with), except that a query never takes more than half of the pair's room while the
passage still needs it: a very long query is cut to that half, so it cannot crowd out the text it is
judged on, and it cannot make the pair unencodable (``transformers``' ``only_second`` raises there).
Queries of the training and evaluation sets are far below half the limit, so for them this is exactly
``only_second``.

The texts are tokenized alone, without truncation, and the pair is assembled from the tokenizer's own
template (``[CLS] query [SEP] passage [SEP]``, token types 0 then 1, for BERT): each distinct query of a
batch is tokenized once, and the untruncated length of every pair comes for free.
"""

from __future__ import annotations

from dataclasses import dataclass


def pair_lengths(query_tokens: int, passage_tokens: int, room: int) -> tuple[int, int]:
    """How many of the query's and the passage's tokens a pair keeps, given ``room`` tokens for both
    (the limit less the special tokens)."""
    if query_tokens + passage_tokens <= room:
        return query_tokens, passage_tokens
    query = min(query_tokens, max(room - passage_tokens, room // 2))
    return query, min(passage_tokens, room - query)


@dataclass
class EncodedPairs:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    whole_lengths: list[int]  # each pair's tokens before truncation (with the special tokens)

    @property
    def truncated(self) -> list[bool]:
        return [len(ids) < n for ids, n in zip(self.input_ids, self.whole_lengths)]

    def as_batch(self) -> dict:
        """What a ``transformers`` tokenizer call returns (the training and evaluation code reads this)."""
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids,
                "attention_mask": [[1] * len(ids) for ids in self.input_ids]}


class QueryPassageEncoder:
    """Encodes (query, passage) pairs at ``max_length`` by the rule above. ``tokenizer``: a ``transformers``
    fast tokenizer or the Rust ``tokenizers.Tokenizer`` it wraps (a copy is made: the original's
    truncation and padding settings are left as they are)."""

    def __init__(self, tokenizer, max_length: int):
        from tokenizers import Tokenizer

        spec = getattr(tokenizer, "backend_tokenizer", tokenizer).to_str()
        self._whole = Tokenizer.from_str(spec)
        self._whole.no_truncation()
        self._whole.no_padding()
        self.max_length = max_length
        # the template, read from one post-processed pair of one-token texts: special tokens as they are,
        # 0 / 1 where the query's / the passage's tokens go, each with its token type
        pair = self._whole.post_process(self._whole.encode("a", add_special_tokens=False),
                                        self._whole.encode("a", add_special_tokens=False), add_special_tokens=True)
        texts = iter((0, 1))  # the two texts' places, in order, among the special tokens
        self._template = [(None if special else next(texts), token, token_type)
                          for special, token, token_type in zip(pair.special_tokens_mask, pair.ids, pair.type_ids)]
        self.special_tokens = sum(1 for seq, _, _ in self._template if seq is None)
        if not 0 < max_length - self.special_tokens:
            raise ValueError(f"max_length {max_length} leaves no room for text beside {self.special_tokens} "
                             "special tokens")

    def encode(self, queries: list[str], passages: list[str]) -> EncodedPairs:
        distinct = list(dict.fromkeys(queries))
        query_ids = dict(zip(distinct, (e.ids for e in self._whole.encode_batch(distinct, add_special_tokens=False))))
        passage_ids = [e.ids for e in self._whole.encode_batch(list(passages), add_special_tokens=False)]
        room = self.max_length - self.special_tokens
        input_ids, type_ids, whole = [], [], []
        for query, passage in zip(queries, passage_ids):
            query = query_ids[query]
            keep_query, keep_passage = pair_lengths(len(query), len(passage), room)
            parts = (query[:keep_query], passage[:keep_passage])
            ids, types = [], []
            for seq, token, token_type in self._template:
                part = [token] if seq is None else parts[seq]
                ids += part
                types += [token_type] * len(part)
            input_ids.append(ids)
            type_ids.append(types)
            whole.append(len(query) + len(passage) + self.special_tokens)
        return EncodedPairs(input_ids, type_ids, whole)
