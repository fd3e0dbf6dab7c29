"""Looking inside adapted weights: what training did to each matrix, from tensors alone.

    intruder_dimensions(w0, w, k=10, threshold=0.5)   tuned singular vectors new to the base
    intruder_report({name: (w0, w)}, k, threshold)    the same per matrix and in total
    spectrum(delta)                                   singular values, effective and stable rank
    subspace_similarity(delta_a, delta_b, i, j)       the LoRA paper's normalised subspace overlap

These work on plain (out, in) matrices and import nothing above the library. Getting the
matrices of a finished run (and training runs for the capacity and intrinsic-dimension
searches) is the recipe's and the bench's part: peftlab.recipe.analyze, peftlab.bench.capacity,
peftlab.bench.intrinsic_dim.
"""
from .intruder import check_settings, intruder_dimensions, intruder_report, max_base_similarity
from .spectra import effective_rank, similarity_grid, singular_values, spectrum, stable_rank, subspace_similarity

__all__ = ["check_settings", "effective_rank", "intruder_dimensions", "intruder_report", "max_base_similarity", "similarity_grid",
           "singular_values", "spectrum", "stable_rank", "subspace_similarity"]
