// ethers.js v6 using signd as its node: send a transaction with provider.getSigner(address),
// sign EIP-712 typed data and an EIP-191 message, verify both locally, print one JSON line.
// Usage: node ethers_client.js SIGND_RPC_URL ADDRESS RECIPIENT BEARER_TOKEN
"use strict";
const { ethers } = require("ethers");

async function main() {
  const [url, address, recipient, token] = process.argv.slice(2);
  const request = new ethers.FetchRequest(url);
  request.setHeader("Authorization", `Bearer ${token}`);
  const provider = new ethers.JsonRpcProvider(request);
  try {
    const signer = await provider.getSigner(address);
    const tx = await signer.sendTransaction({ to: recipient, value: ethers.parseEther("0.25") });
    const receipt = await tx.wait(1, 60000);

    const domain = {
      name: "signd e2e",
      version: "1",
      chainId: (await provider.getNetwork()).chainId,
      verifyingContract: "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC",
    };
    const types = {
      Person: [
        { name: "name", type: "string" },
        { name: "wallet", type: "address" },
      ],
      Order: [
        { name: "from", type: "Person" },
        { name: "amount", type: "uint256" },
        { name: "memo", type: "bytes" },
      ],
    };
    const value = {
      from: { name: "Cow", wallet: "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826" },
      amount: 10n ** 20n,
      memo: "0x00ff",
    };
    const typedSignature = await signer.signTypedData(domain, types, value);
    const message = "hello from ethers";
    const messageSignature = await signer.signMessage(message);

    console.log(
      JSON.stringify({
        hash: tx.hash,
        type: tx.type,
        status: receipt.status,
        from: receipt.from,
        to: receipt.to,
        typedDataSigner: ethers.verifyTypedData(domain, types, value, typedSignature),
        messageSigner: ethers.verifyMessage(message, messageSignature),
      }),
    );
  } finally {
    provider.destroy();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
