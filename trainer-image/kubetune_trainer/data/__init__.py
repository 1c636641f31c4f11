"""The data stage: dataset files, row formats, validation, the seeded split and token statistics."""
