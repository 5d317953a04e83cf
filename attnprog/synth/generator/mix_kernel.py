"""The numba kernel behind vectorised generator evaluation: mix atom rows, then normalise.

Kept apart from :mod:`attnprog.synth.generator.mixing` so numba is imported only when it is needed.
"""

import numpy as np
from numba import njit, prange


# Reassociation lets LLVM vectorise the row sums; results move by ~1 ulp, far below 1e-6.
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract", "arcp"})
def mix_rows(atoms, term_atoms, term_weights, n, out, out_start):
    # atoms [K, c] float64; term_atoms/term_weights [P, T]; out [P, C] float32
    n_programs, n_terms = term_atoms.shape
    n_cells = atoms.shape[1]
    for p in prange(n_programs):
        mixed = np.zeros(n_cells)  # [c] this program's scores on this text
        for t in range(n_terms):
            a = term_atoms[p, t]
            if a >= 0:
                weight = term_weights[p, t]
                for cell in range(n_cells):
                    mixed[cell] += weight * atoms[a, cell]
        for i in range(n):
            start = i * (i + 1) // 2  # row i holds packed cells [start, start + i + 1)
            total = 0.0
            for cell in range(start, start + i + 1):
                total += mixed[cell]
            if total > 0.0:
                inv_total = 1.0 / total
                for cell in range(start, start + i + 1):
                    out[p, out_start + cell] = mixed[cell] * inv_total
            else:  # no score anywhere in the row: one-hot on token 0, as normalise() does
                out[p, out_start + start] = 1.0
                for cell in range(start + 1, start + i + 1):
                    out[p, out_start + cell] = 0.0
