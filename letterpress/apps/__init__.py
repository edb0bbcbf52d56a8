"""Case studies built on letterpress's public API, not parts of the engine: the Sudoku puzzles and solvers
(`sudoku.py`, `sudoku_solve.py`) behind `letterpress sudoku`, the Sudoku recipes and benchmarks/sudoku.py."""
