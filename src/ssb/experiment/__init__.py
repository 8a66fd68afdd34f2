"""Multi-seed experiments: arms x seeds x eval sets from one YAML (`spec`), run with sharing and resume (`runner`),
summarised with intervals over seeds and problems (`results`, `figures`); the `ssb experiment` verb (`cli`)."""
