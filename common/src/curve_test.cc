#include "gatherer/curve.h"

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "gatherer/transport.h"

namespace gatherer {
namespace {

class CurveFilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("gatherer-curve-files-" + std::to_string(::getpid()) + "-" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return (dir_ / name).string(); }
  void Write(const std::string& name, const std::string& text) const { std::ofstream(Path(name)) << text; }

  std::filesystem::path dir_;
};

TEST_F(CurveFilesTest, KeyFilesRoundTripAndTheSecretOneIsPrivate) {
  auto pair = GenerateCurveKeyPair();
  ASSERT_TRUE(pair.has_value()) << pair.error().ToString();
  EXPECT_TRUE(IsCurveKey(pair->public_key));
  EXPECT_TRUE(IsCurveKey(pair->secret_key));
  EXPECT_NE(pair->public_key, pair->secret_key);
  ASSERT_TRUE(WriteCurveKeyFiles(Path("a"), *pair).ok());
  struct stat st {};
  ASSERT_EQ(::stat(Path("a.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto back = ReadCurveKeyPair(Path("a.key"));
  ASSERT_TRUE(back.has_value()) << back.error().ToString();
  EXPECT_EQ(back->public_key, pair->public_key);
  EXPECT_EQ(back->secret_key, pair->secret_key);
  EXPECT_EQ(*ReadCurvePublicKey(Path("a.pub")), pair->public_key);
  EXPECT_EQ(*ReadCurvePublicKey(Path("a.key")), pair->public_key);
  EXPECT_EQ(*ReadCurvePublicKey(pair->public_key), pair->public_key);
  // The public file is no key pair, and nothing is overwritten.
  EXPECT_FALSE(ReadCurveKeyPair(Path("a.pub")).has_value());
  EXPECT_EQ(WriteCurveKeyFiles(Path("a"), *pair).code(), StatusCode::kFailedPrecondition);
}

TEST_F(CurveFilesTest, AllowListsFromAFileOrADirectory) {
  auto a = *GenerateCurveKeyPair(), b = *GenerateCurveKeyPair();
  ASSERT_TRUE(std::filesystem::create_directory(dir_ / "keys"));
  ASSERT_TRUE(WriteCurveKeyFiles(Path("keys/a"), {a.public_key, a.secret_key}).ok());
  std::filesystem::remove(dir_ / "keys" / "a.key");
  std::ofstream(Path("keys/b.pub")) << "curve\n    public-key = \"" << b.public_key << "\"\n";
  auto from_dir = ReadCurveAllowList(Path("keys"));
  ASSERT_TRUE(from_dir.has_value()) << from_dir.error().ToString();
  EXPECT_EQ(*from_dir, (std::unordered_set<std::string>{a.public_key, b.public_key}));
  Write("list", "# operators\n" + a.public_key + "\n\n    public-key = \"" + b.public_key + "\"\n");
  auto from_file = ReadCurveAllowList(Path("list"));
  ASSERT_TRUE(from_file.has_value()) << from_file.error().ToString();
  EXPECT_EQ(*from_file, *from_dir);
}

TEST_F(CurveFilesTest, BadKeysAndListsAreRefusedNamingTheFile) {
  Write("short", "curve\n    public-key = \"abc\"\n");
  auto bad = ReadCurvePublicKey(Path("short"));
  ASSERT_FALSE(bad.has_value());
  EXPECT_NE(bad.error().message().find("short"), std::string::npos) << bad.error().message();
  Write("empty", "# nobody\n");
  EXPECT_EQ(ReadCurveAllowList(Path("empty")).error().code(), StatusCode::kInvalidArgument);
  auto pair = *GenerateCurveKeyPair();
  Write("leak", "secret-key = \"" + pair.secret_key + "\"\n");
  auto leak = ReadCurveAllowList(Path("leak"));
  ASSERT_FALSE(leak.has_value());
  EXPECT_NE(leak.error().message().find("secret"), std::string::npos);
  Write("garbage", "not a key\n");
  auto garbage = ReadCurveAllowList(Path("garbage"));
  ASSERT_FALSE(garbage.has_value());
  EXPECT_NE(garbage.error().message().find("garbage:1"), std::string::npos) << garbage.error().message();
  EXPECT_FALSE(ReadCurveKeyPair(Path("absent")).has_value());
}

TEST(TransportTest, LoopbackEndpointsAreTold) {
  using protocol::IsLoopbackEndpoint;
  EXPECT_TRUE(IsLoopbackEndpoint("tcp://127.0.0.1:5555"));
  EXPECT_TRUE(IsLoopbackEndpoint("tcp://127.1.2.3:1"));
  EXPECT_TRUE(IsLoopbackEndpoint("tcp://localhost:5555"));
  EXPECT_TRUE(IsLoopbackEndpoint("tcp://[::1]:5555"));
  EXPECT_TRUE(IsLoopbackEndpoint("ipc:///tmp/g"));
  EXPECT_TRUE(IsLoopbackEndpoint("inproc://g"));
  EXPECT_FALSE(IsLoopbackEndpoint("tcp://*:5555"));
  EXPECT_FALSE(IsLoopbackEndpoint("tcp://0.0.0.0:5555"));
  EXPECT_FALSE(IsLoopbackEndpoint("tcp://10.0.0.5:5555"));
  EXPECT_FALSE(IsLoopbackEndpoint("tcp://[::]:5555"));
  EXPECT_FALSE(IsLoopbackEndpoint("tcp://eth0:5555"));
}

}  // namespace
}  // namespace gatherer
