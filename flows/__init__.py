"""The application on top of `ipr_core`: the Prefect flows (`ipr_flow`: `ipr` = deployment
`iterate` and its `iteration` subflow; `scale_out`: sharded step scoring on Dask; `serve`),
the `ipr` command line (`cli`, `commands`), the experiment runner (`experiment`), its
report and plots (`report`, `plots`) and the benchmarks (`bench`, `bench_training`)."""
