"""Prefect flows (`ipr_flow`: `ipr` = deployment `iterate`, its `iteration` subflow,
`evaluate`), `ipr serve`, and the `ipr` command line (`cli`)."""
