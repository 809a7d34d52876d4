"""Reports: the metrics every stage prints and the page it writes."""
