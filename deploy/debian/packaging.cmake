# Debian packages, built by CPack (deploy/make-deb.sh; or `cmake --build BUILD --target package`
# in a build configured with -DCMAKE_INSTALL_PREFIX=/usr -DENGRAM_CUDA=OFF):
#   engramd      engramd, engramctl, engram-bench; the tokenizer lut in /usr/share/engram; the
#                systemd unit, /etc/default/engramd, the engram user (postinst); the Python
#                package engram when it was built
#   engramd-dev  libengram_client (static) with its headers, CMake package and pkg-config file
# Runtime dependencies come from dpkg-shlibdeps; the -dev package adds the headers its headers
# include.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME engramd)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "engramd developers <engramd@localhost>")
set(CPACK_PACKAGE_VENDOR engramd)
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "Memory-tiering daemon for Engram conditional-memory tables")
set(CPACK_PACKAGE_DESCRIPTION
    "engramd owns Engram tables across host memory and NVMe (and GPU memory in a CUDA build),\n"
    "shared by every inference worker on the host, over gRPC or shared memory.")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL daemon dev)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_DAEMON_PACKAGE_NAME engramd)
set(CPACK_DEBIAN_DAEMON_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_DAEMON_PACKAGE_DEPENDS "adduser")
if(ENGRAM_HAVE_PYTHON)
  # The extension module's own libraries come from shlibdeps; the package imports numpy.
  set(CPACK_DEBIAN_DAEMON_PACKAGE_DEPENDS "adduser, python3 (>= 3.11), python3 (<< 3.12), python3-numpy")
endif()
set(CPACK_DEBIAN_DAEMON_PACKAGE_CONTROL_EXTRA
    "${CMAKE_CURRENT_LIST_DIR}/postinst;${CMAKE_CURRENT_LIST_DIR}/prerm;${CMAKE_CURRENT_LIST_DIR}/postrm;${CMAKE_CURRENT_LIST_DIR}/conffiles")
set(CPACK_DEBIAN_DEV_PACKAGE_NAME engramd-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_ARCHITECTURE amd64)
set(CPACK_DEBIAN_DEV_PACKAGE_DEPENDS
    "engramd (= ${PROJECT_VERSION}), libabsl-dev, libgrpc++-dev, libprotobuf-dev, libopenblas-dev, libxxhash-dev, nlohmann-json3-dev, pkg-config")
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)

install(FILES ${PROJECT_SOURCE_DIR}/deploy/systemd/engramd.service DESTINATION lib/systemd/system COMPONENT daemon)
install(FILES ${CMAKE_CURRENT_LIST_DIR}/engramd.default DESTINATION /etc/default RENAME engramd COMPONENT daemon)
install(FILES ${PROJECT_SOURCE_DIR}/README.md DESTINATION ${CMAKE_INSTALL_DOCDIR} COMPONENT daemon)
include(CPack)
