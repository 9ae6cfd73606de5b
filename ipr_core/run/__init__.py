"""A run: the one stage list and its resume rule (`loop`), what stages share (`context`),
expert data and step queries (`pipeline`), stage costs (`costs`), the run manifest
(`manifest`), Parquet shards for scale-out (`shards`) and `ipr run --no-prefect` (`direct`)."""
