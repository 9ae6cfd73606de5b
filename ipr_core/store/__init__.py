"""Persistence at the edge: the DuckDB store (`store`: schema, SQL, row mapping), the rows
each stage owns (`scopes`), the IPR/ETO JSON files in and out (`formats`) and stored rows as
text a person reads (`transcripts`)."""
