"""The numeric core: models, corpora, extraction, ranking, selection, head replacement."""
