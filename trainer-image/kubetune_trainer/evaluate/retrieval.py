"""Retrieval few-shot: for each evaluated row, the training rows most like it (TF-IDF cosine) as its shots."""

from __future__ import annotations

from collections.abc import Sequence

from kubetune_trainer.data.rows import Example

QUERY_BLOCK = 64
# Ranked candidates looked at beyond k, to make up for copies of the query itself among them.
DUPLICATE_SLACK = 8


def retrieved_shots(train: Sequence[Example], queries: Sequence[Example], k: int) -> list[list[Example]]:
    """For each query, its k most similar train examples by TF-IDF cosine of their inputs, least similar first (the
    closest shot sits next to the question). Deterministic: ties go to the earlier train row. A train row that is
    the query itself (same input and answer) is never one of its shots."""
    if not train or not queries or k <= 0:
        return [[] for _ in queries]
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    # Word unigrams and bigrams with sublinear counts: the usual lexical retriever; rows come out L2-normalised, so
    # a dot product is the cosine.
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    train_vectors = vectorizer.fit_transform([example.input_text for example in train])
    query_vectors = vectorizer.transform([query.input_text for query in queries])
    order = np.arange(len(train))
    chosen: list[list[Example]] = []
    # Blocks of queries bound the dense similarity matrix (block x train rows) whatever the eval size.
    for start in range(0, len(queries), QUERY_BLOCK):
        block = (query_vectors[start : start + QUERY_BLOCK] @ train_vectors.T).toarray()
        for offset, scores in enumerate(block):
            query = queries[start + offset]
            # Highest similarity first, then the earlier row (lexsort sorts by its last key first).
            candidates = np.lexsort((order, -scores))[: k + DUPLICATE_SLACK]
            picked = [train[index] for index in candidates if not is_same_row(train[index], query)][:k]
            chosen.append(picked[::-1])
    return chosen


def is_same_row(candidate: Example, query: Example) -> bool:
    """The evaluated row itself (a validation split can repeat a train row): never its own shot."""
    return candidate.input_text == query.input_text and candidate.completion == query.completion
