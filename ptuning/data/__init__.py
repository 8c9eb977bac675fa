"""LAMA's files, vocabularies, tasks and templates; the full set fetched, the quick start's shipped."""
