"""Training and evaluation data: loaders for files, benchmarks and Hub datasets (`loaders`), and the built-in
arithmetic word-problem generator (`arith`)."""

from ssb.data.loaders import BENCHMARKS, DataError, Example, data_files, load_examples, question_records

__all__ = ["BENCHMARKS", "DataError", "Example", "data_files", "load_examples", "question_records"]
