// galore: the exact SVD policy: the top-r singular vectors of G, as galore_torch
// computes them (torch.linalg.svd).
//
// An SVD policy holds hyperparameters only, with no Eigen and no CUDA, so that
// both backends take the same policy object; each backend computes the basis
// with its own compute_basis overload (backend/eigen/svd.hpp on the CPU: Eigen's
// divide-and-conquer SVD in float32; backend/cuda/refresh.cuh on the GPU: the
// eigenvectors of the smaller Gram matrix in float64). Every policy returns the
// top-`rank` singular vectors on the requested side, sorted by singular value,
// with canonical signs oriented like the previous basis (basis.hpp), so that
// signs stay continuous across refreshes. A policy that cannot compute the
// vectors (G holds NaN or Inf, or the algorithm failed) leaves NaN in its
// result: the projector then keeps the basis it has.
//
// A policy may provide `void validate() const`, which the projector and the
// optimizer facades call when they are built. A policy of one's own for the CPU
// provides a member
//   void compute(ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous, Basis& out) const;
// or a compute_basis(policy, G, rank, side, previous, out) found by ADL.
#pragma once

namespace galore::svd {

struct Exact {};

}  // namespace galore::svd
