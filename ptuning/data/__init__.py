"""LAMA's files, vocabularies, tasks, templates and batches; the full set fetched, the quick start's shipped."""
