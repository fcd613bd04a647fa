"""Data: record formats, the Alpaca template, tokenisation with positional label masking, BIG-bench prep."""
