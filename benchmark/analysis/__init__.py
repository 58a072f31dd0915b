"""Analysis of a result store: statistics, significance, tables, plots and the report (reads records; never trains)."""
