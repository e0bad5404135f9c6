"""veil's own Presidio recognizers: names, phone numbers, street addresses,
card numbers, and the tokenizer they share."""

__all__: list[str] = []
