"""`credbroker run` as a pipeline: the options value it is built from (``options``)."""
