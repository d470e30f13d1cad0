# ctest driver: builds and runs the consumer project against galore.
#   cmake -DMODE=<find_package|add_subdirectory|fetchcontent> -DGALORE_BUILD_DIR=... \
#         -DGALORE_SOURCE_DIR=... -DWORK_DIR=... -P run_consumer.cmake
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
set(args -DGALORE_CONSUME=${MODE} -DCMAKE_BUILD_TYPE=Release)
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} --install ${GALORE_BUILD_DIR} --prefix ${WORK_DIR}/prefix)
  if(NOT EXISTS ${WORK_DIR}/prefix/lib/cmake/galore/galore-config.cmake
     OR NOT EXISTS ${WORK_DIR}/prefix/include/galore/galore.hpp)
    message(FATAL_ERROR "the install prefix lacks galore's config or headers")
  endif()
  list(APPEND args -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix)
else()
  list(APPEND args -DGALORE_SOURCE_DIR=${GALORE_SOURCE_DIR})
endif()
run(${CMAKE_COMMAND} -S ${CMAKE_CURRENT_LIST_DIR} -B ${WORK_DIR}/build ${args})
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build -j2)
run(${WORK_DIR}/build/consumer)
