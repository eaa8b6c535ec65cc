"""Retrieval evaluation sets and the script that scores them (`python -m rag.eval.retrieval`)."""
