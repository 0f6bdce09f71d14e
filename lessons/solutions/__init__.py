"""Answers to the lessons' exercises, one module per lesson. A lesson's notebook leaves the
exercise to the reader (a stub that raises NotImplementedError) and checks these answers in
its final cell, so that CI proves its checker passes a right answer."""
