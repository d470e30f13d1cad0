# galore_add_header_check(<target> <extension> HEADERS <h>... [BACKEND_FREE <h>...])
#
# An object library <target> with one source per header (extension cpp or cu)
# that includes the header twice: it must compile on its own, and its include
# guard must hold. The headers listed in BACKEND_FREE are shared by the Eigen and
# the CUDA backends, so they must not pull in Eigen: their sources fail if they do.
function(galore_add_header_check target extension)
  cmake_parse_arguments(ARG "" "" "HEADERS;BACKEND_FREE" ${ARGN})
  set(sources)
  foreach(header IN LISTS ARG_HEADERS)
    string(MAKE_C_IDENTIFIER ${header} id)
    set(source ${CMAKE_CURRENT_BINARY_DIR}/header_check/${id}.${extension})
    set(content "#include <${header}>\n#include <${header}>\n")
    if(header IN_LIST ARG_BACKEND_FREE)
      string(APPEND content "#ifdef EIGEN_CORE_H\n#error \"${header} is shared by both backends and must not include Eigen\"\n#endif\n")
    endif()
    file(CONFIGURE OUTPUT ${source} CONTENT "${content}")
    list(APPEND sources ${source})
  endforeach()
  add_library(${target} OBJECT ${sources})
endfunction()

# The headers both backends share: no Eigen, no CUDA runtime headers, and device
# code may call their GALORE_HOST_DEVICE functions.
set(GALORE_BACKEND_FREE_HEADERS
    galore/config.hpp galore/policies.hpp galore/projection_type.hpp galore/projector_options.hpp
    galore/optim/adam_config.hpp galore/optim/blockwise8bit_state.hpp galore/optim/step_result.hpp
    galore/rounding/philox.hpp
    galore/rounding/rounding_mode.hpp galore/quant/dynamic_map.hpp galore/quant/group_quantized.hpp galore/quant/nf4_codes.hpp galore/schedule/drift.hpp
    galore/schedule/fixed_gap.hpp galore/schedule/lazy.hpp galore/schedule/traits.hpp galore/svd/exact.hpp galore/svd/randomized.hpp
    galore/svd/warm_start.hpp galore/checkpoint/atomic_write.hpp galore/checkpoint/describe.hpp
    galore/checkpoint/fields.hpp galore/checkpoint/file.hpp galore/checkpoint/format.hpp)
file(GLOB galore_backend_free_dirs RELATIVE ${PROJECT_SOURCE_DIR}/include CONFIGURE_DEPENDS
     ${PROJECT_SOURCE_DIR}/include/galore/core/*.hpp ${PROJECT_SOURCE_DIR}/include/galore/math/*.hpp)
list(APPEND GALORE_BACKEND_FREE_HEADERS ${galore_backend_free_dirs})
