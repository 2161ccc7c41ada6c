from s2f_jax.results.writer import ORIGINAL_COLUMNS, format_table, read_metrics, run_metadata, write_config, write_metrics
