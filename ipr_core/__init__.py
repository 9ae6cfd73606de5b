"""IPR core: the method as a plain library (no Prefect imports here)."""
