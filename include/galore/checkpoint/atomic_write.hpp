// galore: the atomic, durable write of a checkpoint file (save_checkpoint(opt,
// path) of every facade).
//
// A save to `path` writes a temporary file in the directory of the file it
// replaces, flushes it to disk, renames it over that file and flushes the
// directory, so that readers see the old checkpoint or the new one, never a mix,
// and the new one survives a power loss once the save returns.
//  - A symbolic link is written through: the file replaced is the one at the end
//    of its chain of links (created if the link dangles); the links stay.
//  - Anything but a regular file there (a directory, a device, a FIFO, a socket)
//    is refused with checkpoint_error and left alone.
//  - Temporaries are named <name>.galore-tmp-<pid>-<16 hex digits> beside the
//    target. A save removes those of the same target whose process no longer
//    runs on this machine (left by a killed save), and nothing else.
//  - A replaced file's permission bits carry over to the new one.
#pragma once

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <system_error>

#include "format.hpp"

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#endif

namespace galore::checkpoint {

// The temporaries of target file `name`: "<name>.galore-tmp-<pid>-<16 hex>".
inline constexpr const char* kTempInfix = ".galore-tmp-";

// If `file` is a temporary of `name`, its process id; otherwise -1.
inline long temp_owner(const std::string& file, const std::string& name) {
  const std::string prefix = name + kTempInfix;
  if (file.size() <= prefix.size() || file.compare(0, prefix.size(), prefix) != 0) return -1;
  const std::string rest = file.substr(prefix.size());
  const std::size_t dash = rest.find('-');
  if (dash == 0 || dash == std::string::npos || dash > 10 || rest.size() - dash - 1 != 16) return -1;
  long pid = 0;
  for (std::size_t i = 0; i < dash; ++i) {
    if (rest[i] < '0' || rest[i] > '9') return -1;
    pid = pid * 10 + (rest[i] - '0');
  }
  for (std::size_t i = dash + 1; i < rest.size(); ++i) {
    const char c = rest[i];
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return -1;
  }
  return pid;
}

#if defined(__unix__) || defined(__APPLE__)

inline std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

// The file a save to `path` replaces: `path`, or the end of its chain of
// symbolic links. Refuses anything that exists there and is not a regular file.
inline std::string save_target(const std::string& path, struct ::stat& st, bool& exists) {
  namespace fs = std::filesystem;
  fs::path p(path);
  for (int hops = 0;; ++hops) {
    if (::lstat(p.c_str(), &st) != 0) {
      const int err = errno;
      if (err != ENOENT)
        throw checkpoint_error("galore checkpoint: cannot examine " + p.string() + ": " + errno_text(err));
      exists = false;
      return p.string();
    }
    if (!S_ISLNK(st.st_mode)) {
      if (!S_ISREG(st.st_mode))
        throw checkpoint_error("galore checkpoint: " + p.string() +
                               " is not a regular file (a directory, device, FIFO or socket); refusing to replace it");
      exists = true;
      return p.string();
    }
    if (hops == 40) throw checkpoint_error("galore checkpoint: too many levels of symbolic links at " + path);
    std::error_code ec;
    const fs::path link = fs::read_symlink(p, ec);
    if (ec) throw checkpoint_error("galore checkpoint: cannot read the link " + p.string() + ": " + ec.message());
    p = link.is_absolute() ? link : p.parent_path() / link;
  }
}

// Removes the temporaries of `name` in `dir` whose process no longer runs.
inline void remove_stale_temporaries(const std::filesystem::path& dir, const std::string& name) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::directory_iterator it(dir.empty() ? fs::path(".") : dir, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const std::string file = it->path().filename().string();
    const long pid = temp_owner(file, name);
    if (pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    if (pid <= static_cast<long>(std::numeric_limits<::pid_t>::max()) &&
        !(::kill(static_cast<::pid_t>(pid), 0) != 0 && errno == ESRCH))
      continue;  // the process exists (or may: not ours to signal)
    struct ::stat st;
    if (::lstat(it->path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) ::unlink(it->path().c_str());
  }
}

inline std::string random_hex16() {
  static std::atomic<std::uint64_t> counter{0};
  std::uint64_t x = counter++ * 0x9E3779B97F4A7C15ull;
  try {
    std::random_device rd;
    x ^= (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (const std::exception&) {
  }
  x ^= static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  static const char digits[] = "0123456789abcdef";
  std::string s(16, '0');
  for (int i = 15; i >= 0; --i, x >>= 4) s[static_cast<std::size_t>(i)] = digits[x & 0xF];
  return s;
}

inline void write_atomically(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  struct ::stat st {};
  bool exists = false;
  const std::string target = save_target(path, st, exists);
  const fs::path target_path(target);
  const fs::path dir = target_path.parent_path();
  const std::string name = target_path.filename().string();
  if (name.empty() || name == "." || name == "..")
    throw checkpoint_error("galore checkpoint: " + path + " does not name a file");
  remove_stale_temporaries(dir, name);

  std::string tmp;
  int fd = -1;
  for (int attempt = 0; fd < 0; ++attempt) {
    tmp = (dir / (name + kTempInfix + std::to_string(static_cast<long>(::getpid())) + "-" + random_hex16())).string();
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0 && (errno != EEXIST || attempt == 16))
      throw checkpoint_error("galore checkpoint: cannot create " + tmp + ": " + errno_text(errno));
  }
  auto fail = [&](const std::string& what, int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw checkpoint_error("galore checkpoint: " + what + " " + tmp + " failed: " + errno_text(err));
  };
  if (exists) (void)::fchmod(fd, st.st_mode & 07777);  // best effort: keep the replaced file's mode
  std::size_t done = 0;
  while (done < bytes.size()) {
    const ::ssize_t k = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) fail("writing", k < 0 ? errno : EIO);
    done += static_cast<std::size_t>(k);
  }
  if (::fsync(fd) != 0) fail("flushing", errno);
  const int fd_closed = fd;
  fd = -1;
  if (::close(fd_closed) != 0) fail("closing", errno);
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    throw checkpoint_error("galore checkpoint: renaming " + tmp + " to " + target + " failed: " + errno_text(err));
  }
  // The rename is durable once the directory is flushed.
  const std::string d = dir.empty() ? std::string(".") : dir.string();
  const int dfd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int err = dfd < 0 ? errno : 0;
  if (dfd >= 0) {
    if (::fsync(dfd) != 0) err = errno;
    ::close(dfd);
  }
  if (err != 0 && err != EINVAL && err != ENOTSUP)  // a file system that cannot sync directories
    throw checkpoint_error("galore checkpoint: " + target + " was written, but flushing its directory " + d +
                           " failed: " + errno_text(err));
}

#else

inline void write_atomically(const std::string& path, const std::string& bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (fs::exists(status) && !fs::is_regular_file(status))
    throw checkpoint_error("galore checkpoint: " + path + " is not a regular file; refusing to replace it");
  static std::atomic<unsigned long long> counter{0};
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", counter++);
  const std::string tmp = path + kTempInfix + "0-" + hex;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.flush();
    if (!out) {
      out.close();
      std::remove(tmp.c_str());
      throw checkpoint_error("galore checkpoint: writing " + tmp + " failed");
    }
  }
  fs::rename(tmp, path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw checkpoint_error("galore checkpoint: renaming " + tmp + " to " + path + " failed: " + ec.message());
  }
}

#endif

}  // namespace galore::checkpoint
