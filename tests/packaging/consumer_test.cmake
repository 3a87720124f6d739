# ctest package_consumer: installs the build tree into a fresh prefix, then
# configures, builds and runs tests/packaging/consumer against it.
#   cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK_DIR=... -P consumer_test.cmake
file(REMOVE_RECURSE "${WORK_DIR}")
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix"
                RESULT_VARIABLE rc OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed: ${rc}")
endif()
# Only the public API is installed.
foreach(private protocol.h transport.h wake_fd.h signals.h strings.h curve.h broker.h worker.h)
  if(EXISTS "${WORK_DIR}/prefix/include/gatherer/${private}")
    message(FATAL_ERROR "private header installed: include/gatherer/${private}")
  endif()
endforeach()
execute_process(COMMAND "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/packaging/consumer" -B "${WORK_DIR}/build"
                        -G Ninja "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix" -DCMAKE_BUILD_TYPE=Release
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring the consumer failed: ${rc}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --build "${WORK_DIR}/build" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building the consumer failed: ${rc}")
endif()
foreach(program consumer consumer_remote)
  execute_process(COMMAND "${WORK_DIR}/build/${program}" RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${program} failed: ${rc}")
  endif()
endforeach()
# gatherer::remote leaves the embedded worker out, and with it libcurl and
# oneTBB; gatherer::client brings them. Read from the link lines (ldd would
# not tell: the linker drops a library nothing calls).
file(READ "${WORK_DIR}/build/build.ninja" ninja)
string(REGEX MATCHALL "build consumer_remote: [^\n]*\n([ ][^\n]*\n)*" remote_rule "${ninja}")
string(REGEX MATCHALL "build consumer: [^\n]*\n([ ][^\n]*\n)*" client_rule "${ninja}")
if(NOT remote_rule MATCHES "libgatherer_remote" OR NOT client_rule MATCHES "libgatherer_client")
  message(FATAL_ERROR "link rules not found in build.ninja")
endif()
if(remote_rule MATCHES "curl|tbb|libgatherer_worker")
  message(FATAL_ERROR "consumer_remote links the worker, libcurl or oneTBB:\n${remote_rule}")
endif()
if(NOT client_rule MATCHES "curl" OR NOT client_rule MATCHES "tbb")
  message(FATAL_ERROR "consumer (gatherer::client) lacks libcurl or oneTBB, so this check proves nothing:\n${client_rule}")
endif()
