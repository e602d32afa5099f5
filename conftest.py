# Makes the repository root importable for the tests (models, utils, loss, data).
