"""Prefect flows (`ipr_flow`: `ipr` = deployment `iterate` and its `iteration` subflow;
`scale_out`: sharded step scoring on Dask), `ipr serve`, and the `ipr` command line (`cli`)."""
