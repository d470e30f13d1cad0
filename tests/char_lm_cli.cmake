cmake_policy(SET CMP0007 NEW)  # keep empty list elements (empty val_loss fields)
# ctest driver for the char_lm example (cmake -DCHAR_LM=... -DWORK_DIR=... -P char_lm_cli.cmake):
#  - `char_lm --optimizer NAME --steps N --csv FILE` runs for every optimizer with no
#    further arguments and writes the documented header;
#  - on a small model, val_loss falls from its first value for every optimizer;
#  - per-layer updates give exactly the trajectory of end-of-step updates, with
#    peak gradient memory bounded by the largest parameter.
set(header "step,train_loss,val_loss,tokens_per_s,optimizer_state_bytes,gradient_bytes")
set(small --width 64 --layers 2 --heads 2 --context 32 --batch 4 --eval-every 10 --quiet --rank 16 --gap 20)
file(MAKE_DIRECTORY ${WORK_DIR})

function(run_char_lm)
  execute_process(COMMAND ${CHAR_LM} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "char_lm ${ARGN} failed (${rc}):\n${out}\n${err}")
  endif()
endfunction()

# Column `col` (0-based) of the CSV's data rows, empty fields skipped.
function(csv_column file col out)
  file(STRINGS ${file} lines)
  list(POP_FRONT lines first)
  if(NOT first STREQUAL header)
    message(FATAL_ERROR "${file}: header is '${first}', expected '${header}'")
  endif()
  set(values)
  foreach(line IN LISTS lines)
    string(REPLACE "," ";" fields "${line};")
    list(GET fields ${col} v)
    if(NOT v STREQUAL "")
      list(APPEND values ${v})
    endif()
  endforeach()
  set(${out} ${values} PARENT_SCOPE)
endfunction()

foreach(opt adamw galore galore8bit qgalore)
  # Defaults only (the full-size model, two steps): runs and writes the header.
  run_char_lm(--optimizer ${opt} --steps 2 --csv ${WORK_DIR}/${opt}_default.csv --sample 0)
  csv_column(${WORK_DIR}/${opt}_default.csv 0 steps)
  list(LENGTH steps n)
  if(NOT n EQUAL 2)
    message(FATAL_ERROR "${opt}: expected 2 rows, got ${n}")
  endif()

  run_char_lm(--optimizer ${opt} --steps 60 --csv ${WORK_DIR}/${opt}.csv ${small})
  csv_column(${WORK_DIR}/${opt}.csv 2 val)
  list(GET val 0 first)
  list(GET val -1 last)
  if(NOT last LESS first)
    message(FATAL_ERROR "${opt}: held-out loss did not fall (${first} -> ${last})")
  endif()
  message(STATUS "${opt}: held-out loss ${first} -> ${last}")

  run_char_lm(--optimizer ${opt} --steps 60 --csv ${WORK_DIR}/${opt}_per_layer.csv ${small} --per-layer)
  foreach(col 1 2)
    csv_column(${WORK_DIR}/${opt}.csv ${col} a)
    csv_column(${WORK_DIR}/${opt}_per_layer.csv ${col} b)
    if(NOT a STREQUAL b)
      message(FATAL_ERROR "${opt}: per-layer updates changed the trajectory (column ${col})")
    endif()
  endforeach()
  csv_column(${WORK_DIR}/${opt}_per_layer.csv 5 grads)
  list(GET grads -1 peak)
  # The largest parameters hold 256 x 64 floats (token embeddings, MLP matrices).
  if(NOT peak EQUAL 65536)
    message(FATAL_ERROR "${opt}: per-layer peak gradient bytes ${peak}, expected 65536 (the largest parameter)")
  endif()
endforeach()
