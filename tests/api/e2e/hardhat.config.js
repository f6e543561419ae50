// A bare hardhat network for signd's end-to-end tests: no contracts, the default accounts.
module.exports = {
  networks: { hardhat: { chainId: 31337 } },
};
