// galore: the exact SVD policy (Eigen's divide-and-conquer SVD in float32).
//
// An SVD policy fills a Basis with the top-`rank` singular vectors of G on the
// requested side, sorted by singular value, with canonical signs:
//
//   void compute(ConstMatrixRef<float> G, Index rank, Side side,
//                const BasisView* previous, Basis& out) const;
//
// `previous` is the basis in use before this refresh (null at the first one);
// warm-started policies start from it, and every policy orients its vectors like
// it (fix_signs in basis.hpp) so that signs stay continuous across refreshes.
// A policy that cannot compute the vectors (G holds NaN or Inf, or the algorithm
// failed) leaves NaN in `out`: the projector then keeps the basis it has.
// A policy may provide `void validate() const`, which the projector and the
// optimizer facade call when they are built.
#pragma once

#include <Eigen/SVD>
#include <cmath>

#include "../basis.hpp"

namespace galore::svd {

struct Exact {
  void compute(ConstMatrixRef<float> G, Index rank, Side side, const BasisView* previous,
               Basis& out) const {
    unsigned flags = 0;
    if (side != Side::Right) flags |= Eigen::ComputeThinU;
    if (side != Side::Left) flags |= Eigen::ComputeThinV;
    // BDCSVD works column-major; it copies G once, divided by max |G|, so entries
    // near float32's limits do not overflow its products. It reports a G holding
    // NaN or Inf as InvalidInput, without vectors.
    Eigen::BDCSVD<Eigen::MatrixXf> svd(G, flags);
    out.side = side;
    if (svd.info() != Eigen::Success) {
      if (side != Side::Right) out.left = MatrixF::Constant(G.rows(), rank, NAN);
      if (side != Side::Left) out.right = MatrixF::Constant(rank, G.cols(), NAN);
      return;
    }
    if (side != Side::Right) out.left = svd.matrixU().leftCols(rank);
    if (side != Side::Left) out.right = svd.matrixV().leftCols(rank).transpose();
    fix_signs(out, previous);
  }
};

}  // namespace galore::svd
